"""A neural-memory checkpoint and its logits, made by the code before `model.memory.normalize_values` existed
(free values; commit 2a26f7a) for the migration test: python make_neural_free_values.py OUT_DIR."""
import sys, torch
from ltm_core.configuration import compose, to_dict
from ltm_core.config import TitanConfig
from ltm_core.model import TitanModel
out = sys.argv[1]
cfg = compose(["model/memory=neural", "model.hidden_size=16", "model.num_attention_heads=2", "model.intermediate_size=32",
               "model.num_hidden_layers=2", "model.segment_length=8", "model.memory.placement=mag",
               "model.memory.slots=8", "model.memory.dim=8", "model.memory.chunk=4", "data.seq_len=32"])
assert "normalize_values" not in to_dict(cfg)["model"]["memory"]
torch.manual_seed(0)
ids = torch.randint(0, 256, (2, 45))
torch.manual_seed(1)
model = TitanModel(TitanConfig.from_dict(to_dict(cfg)["model"])).eval()
with torch.no_grad():  # weights away from their init, so every parameter matters
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    for block in model.blocks:  # values far from unit norm, as training made them
        block.memory.kv.weight[8:].mul_(8.0)
state = {"model." + k: v for k, v in model.state_dict().items()}
torch.save({"state_dict": state, "hyper_parameters": {"config": to_dict(cfg)}, "global_step": 0},
           f"{out}/neural_free_values.ckpt")
with torch.no_grad():
    torch.save({"input_ids": ids, "logits": model(ids).logits[..., :32].clone()}, f"{out}/neural_free_values_logits.pt")
logits = torch.load(f"{out}/neural_free_values_logits.pt")["logits"]
assert torch.isfinite(logits).all()
print(model.num_parameters())
