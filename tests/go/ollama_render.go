// Renders an Ollama Modelfile TEMPLATE with Go's own text/template, the engine Ollama uses.
//
// stdin: {"Template": "...", "System": "...", "Messages": [{"Role": "user", "Content": "..."}], "Prompt": "", "Response": ""}
// stdout: the rendering. The fields are those Ollama's template.Execute passes a template that uses
// .Messages (github.com/ollama/ollama, template/template.go): the caller collates the messages as Ollama does.
// Parsed as Ollama parses: missingkey=zero and its `json` function.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

type Input struct {
	Template, System, Prompt, Response string
	Messages                           []*Message
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	t := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template))
	data := map[string]any{"System": in.System, "Messages": in.Messages, "Prompt": in.Prompt, "Response": in.Response}
	if err := t.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
