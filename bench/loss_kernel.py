"""The SFT loss alone at SmolLM2's head (hidden 576, vocab 49152), one thread, forward + backward of N tokens:
finetune/loss.py's chunks, TRL 1.16's fused LM head on a device without Triton (its torch fallback), and plain
full logits (log_softmax). CPU seconds per call (mean of 3), the profiler's peak allocation, minor page faults.

    python bench/loss_kernel.py 1024 ours|trl|plain
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import resource
import time

import torch
torch.set_num_threads(1); torch.manual_seed(0)
from finetune.loss import chunked_log_probs
from trl.kernels import ChunkedLogProbFunction as T
N,H,V=int(sys.argv[1]),576,49152
h=torch.randn(N,H,requires_grad=True); w=torch.randn(V,H)*0.05
t=torch.randint(0,V,(N,))
def ours():
    lp,e,k=chunked_log_probs(h,w,t); (-lp.sum()).backward(); return lp
def trl():
    lp,e,*_=T.apply(h,w,None,t,1.0,32768,None,1.0,("log_probs","entropy","is_top1")); (-lp.sum()).backward(); return lp
def plain():
    z=h@w.t(); lp=torch.log_softmax(z.float(),-1).gather(1,t[:,None]).squeeze(1); (-lp.sum()).backward(); return lp
which=sys.argv[2]
f={'ours':ours,'trl':trl,'plain':plain}[which]
f(); h.grad=None
import torch.profiler as P
t0=time.process_time()
for _ in range(3): f(); h.grad=None
dt=(time.process_time()-t0)/3
with P.profile(activities=[P.ProfilerActivity.CPU], profile_memory=True) as prof:
    f()
# peak allocation
cur=peak=0
evs=sorted((e for e in prof.profiler.kineto_results.events() if e.name()=="[memory]"), key=lambda e:e.start_ns())
for e in evs:
    cur+=e.nbytes(); peak=max(peak,cur)

print(which, N, f"{dt:.3f}s/step", f"peak~{peak/2**20:.0f}MiB", "minflt", resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
