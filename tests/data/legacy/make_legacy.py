"""Legacy (ltm < 0.2) checkpoints and their logits, made by the old code (commit a2928ad) for the migration test."""
import sys, torch
from ltm_core.configuration import compose
from ltm_core.config import TitanConfig
from ltm_core.model import TitanModel
from ltm_core.configuration import to_dict
out = sys.argv[1]
common = ["model.hidden_size=16", "model.num_attention_heads=2", "model.intermediate_size=32", "model.num_hidden_layers=2", "model.segment_length=8",
          "model.memory_slots=8", "data.seq_len=32"]
variants = {
    "tokens": ["model.memory_read=tokens", "model.memory_write=select", "model.memory_dim=16", "model.read_importance=true",
               "model.importance_penalty=1.0", "model.importance_detach=1.0", "model.short_conv=4", "model.short_conv_carry=true",
               "model.select_dedup=0.97"],
    "slots": ["model.memory_dim=8"],
    "delta": ["model.memory_write=delta", "model.memory_dim=8", "model.write_from=attention"],
    "importance": ["model.memory_write=importance", "model.memory_dim=8"],
}
torch.manual_seed(0)
ids = torch.randint(0, 256, (2, 45))
for name, extra in variants.items():
    cfg = compose(common + extra)
    torch.manual_seed(1)
    model = TitanModel(TitanConfig.from_dict(to_dict(cfg)["model"])).eval()
    with torch.no_grad():  # weights away from their init, so every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"config": to_dict(cfg)}, "global_step": 0},
               f"{out}/{name}.ckpt")
    with torch.no_grad():
        torch.save({"input_ids": ids, "logits": model(ids).logits[..., :32].clone()}, f"{out}/{name}_logits.pt")
    print(name, model.num_parameters())
