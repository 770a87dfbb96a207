"""GPU checks of the trainer: fp16 + GradScaler, bf16, fp32 on CUDA; checkpoint/resume on CUDA."""
import sys, json, time, os
sys.path.insert(0, "tests"); sys.path.insert(0, "src")
import torch
from test_trainer import tiny_config, BoxScenes
from mask2former.training.trainer import Trainer, Callback
from mask2former.training.checkpoint import checkpoint_path, load_training_checkpoint
out = os.environ.get("OUT", "/tmp")
report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
for precision in ("fp32", "bf16", "fp16"):
    cfg = tiny_config(f"/tmp/gpu_{precision}", max_iter=4, precision=precision)
    tr = Trainer(cfg, train_dataset=BoxScenes(), progress_bar=False, tensorboard=False)
    w0 = tr.model.transformer_decoder.heads.class_embed.weight.detach().clone()
    t = time.time(); r = tr.fit(); dt = time.time() - t
    w1 = tr.model.transformer_decoder.heads.class_embed.weight.detach()
    state = load_training_checkpoint(checkpoint_path(f"/tmp/gpu_{precision}", 4))
    report[precision] = {"device": str(tr.device), "loss": r["losses"]["loss"], "nonfinite": r["nonfinite_steps"],
                         "moved": float((w1 - w0).abs().max()), "scaler_state": state["scaler"] is not None,
                         "cuda_rng_saved": state["rng"][0]["cuda"] is not None, "seconds": dt,
                         "loss_scale": r["losses"].get("loss_scale")}
# resume on GPU: crash after iteration 3 (checkpoint at 2), resume, compare with uninterrupted
class Crash(Callback):
    def on_step_end(self, trainer, step, logs):
        if step == 3: raise KeyboardInterrupt
def run(d, cb=(), resume=False):
    tr = Trainer(tiny_config(d, max_iter=5, precision="fp16"), train_dataset=BoxScenes(), progress_bar=False, tensorboard=False, callbacks=cb)
    tr.fit(resume=resume); return tr
ref = run("/tmp/gpu_ref")
try:
    run("/tmp/gpu_killed", [Crash()])
except KeyboardInterrupt:
    pass
res = run("/tmp/gpu_killed", resume=True)
diffs = {k: float((ref.model.state_dict()[k].float() - v.float()).abs().max()) for k, v in res.model.state_dict().items()}
report["resume_fp16_cuda"] = {"max_abs_diff": max(diffs.values()), "tensors_differing": sum(d > 0 for d in diffs.values()), "tensors": len(diffs)}
print(json.dumps(report, indent=1))
json.dump(report, open(f"{out}/trainer_gpu.json", "w"), indent=1)
