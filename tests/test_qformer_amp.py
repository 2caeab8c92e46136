"""The Q-Former under bf16 autocast (the GPU path; also run on CPU so it is checked on every machine).

Frozen image features arrive in fp16/bf16 (the paper runs the ViT in fp16); ln_vision and the weights stay
fp32; every stage-1 pass, the ITG cache and the backward must work and stay close to fp32.
"""
import pytest
import torch
from blip2_lab.config import get_preset
from blip2_lab.qformer import Blip2QFormer

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


@pytest.mark.parametrize('device', DEVICES)
def test_bf16_autocast_matches_fp32(device):
    cfg = get_preset('tiny').qformer
    torch.manual_seed(0)
    m = Blip2QFormer(cfg, vision_width=32).to(device).eval()
    img = torch.randn(3, 17, 32, device=device)
    ids = torch.randint(1000, 2000, (3, 9), device=device); ids[:, 0] = 101
    am = torch.ones_like(ids); am[2, 6:] = 0
    with torch.no_grad():
        ref_q = m.image_forward(img).query_output
        ref_itm = m.itm_logits(img, ids, am)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = m.image_forward(img.half() if device == 'cuda' else img.bfloat16(), use_cache=True)
        itm = m.itm_logits(img.bfloat16(), ids, am)
        itg = m.itg_logits(ids, am, query_past_key_values=out.past_key_values)
        tf = m.text_feat(ids, am)
        loss = out.query_output.float().pow(2).mean() + itm.float().sum() + itg.float().logsumexp(-1).mean() + tf.float().sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert (out.query_output.float() - ref_q).abs().max() < 0.1
    assert (itm.float() - ref_itm).abs().max() < 0.1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in m.named_parameters()
               if not n.startswith(('vision_proj', 'temp')))
    assert m.query_tokens.dtype == torch.float32 and m.ln_vision.weight.dtype == torch.float32
