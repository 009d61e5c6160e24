"""Peak host memory of a distillation step at a Llama-3 vocabulary (128 256) and 4k context.

``python -m bench.memory`` runs every measurement in a fresh subprocess (so peaks never mix)
and reads the kernel's high-water mark of resident memory, ``VmHWM`` in /proc/self/status,
absolute and minus the process's resident memory after its imports (``baseline``):

* ``step_<method>``: one whole training step of the real trainer (`sharp_core.train.loop.train`
  on a spec: narrow Llamas, hidden 256, 4 query / 2 KV heads, teacher 2 layers, student 1,
  a 128 256-entry tokenizer built offline, B = 1, N = 4096), for kd, jsd and sharp; the peak
  is read when step 1 has logged, before the end-of-run evaluation and checkpoint;
* ``logit_fused`` / ``logit_dense``: the logit term alone at the same shapes, forward and
  backward, through `sharp_core.objectives.fused.fused_linear_objective` and through the
  dense `sharp_core.objectives.losses.logit_objective` on whole logits;
* ``parity``: the fused loss and its gradients against the dense path in float32 on the
  first ``--parity-tokens`` tokens (the dense reference of all 4095 would itself take ~10 GB).

Only public names of sharp_core are used. See docs/performance.md, "Memory at 128k
vocabulary and 4k context", for the numbers.
"""
