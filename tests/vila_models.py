"""Tiny VILA1.5 checkpoints in Efficient-Large-Model/VILA1.5-3b's exact folder layout.

Top-level config.json with the published keys (the VILA1.5-3b config TensorRT-LLM's
tests/unittest/_torch/modeling/test_modeling_vila.py embeds), llm/ (LlamaForCausalLM, bf16
safetensors, Llama 2 SentencePiece tokenizer), vision_tower/ (SiglipVisionModel +
preprocessor_config.json), mm_projector/ (mlp_downsample: layers.1 LayerNorm, layers.2 and
layers.4 Linear). Sizes are tiny: SigLIP at 70 px, patch 14 (a 5 x 5 grid: odd, like the real
27 x 27, so the padding is exercised), hidden 32; the LLM 128 wide (AWQ's group of 128).

`build_tiny_vila_awq` writes the same with llm/ as VILA1.5-3b-AWQ ships it: a TinyChat v2 `.pt`
(`pack_tinychat_v2` below packs like llm-awq's pack_intweight) and no safetensors shards.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

IMAGE_SIZE, PATCH, V_HIDDEN = 70, 14, 32
LLM_HIDDEN, LLM_INTER = 128, 256
GROUP = 128
N_TOKENS = math.ceil(IMAGE_SIZE // PATCH / 2) ** 2  # 5 x 5 -> 6 x 6 -> 9
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")

# the top-level keys of VILA1.5-3b's config.json besides the three part configs
TOP_LEVEL = {
    "_name_or_path": "Efficient-Large-Model/VILA1.5-3b", "architectures": ["LlavaLlamaModel"], "drop_path_rate": 0.0,
    "hidden_size": LLM_HIDDEN, "image_aspect_ratio": "resize", "interpolate_mode": "linear",
    "mm_hidden_size": V_HIDDEN, "mm_projector_lr": None, "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False, "mm_vision_select_feature": "cls_patch", "mm_vision_select_layer": -2,
    "model_dtype": "torch.bfloat16", "model_type": "llava_llama", "num_video_frames": 8, "resume_path": "./vlm",
    "s2": False, "s2_max_split_size": 336, "s2_scales": "336,672,1008", "transformers_version": "4.36.2",
    "tune_language_model": True, "tune_mm_projector": True, "tune_vision_tower": True, "vision_resolution": -1,
}
PROJECTOR_CONFIG = {"_name_or_path": "./mm_projector", "architectures": ["MultimodalProjector"],
                    "mm_projector_type": "mlp_downsample", "model_type": "v2l_projector",
                    "torch_dtype": "bfloat16", "transformers_version": "4.36.2"}
PREPROCESSOR = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 3,
                "rescale_factor": 0.00392156862745098, "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}


class NotATensor:
    """Stands for code a pickle could carry: torch.load(weights_only=True) must refuse it."""

    def __init__(self, note: str):
        self.note = note


def _tokenizer(out: Path) -> None:
    from tiny_models import train_llama2_spm_only_tokenizer

    train_llama2_spm_only_tokenizer(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template")  # VILA's llm/ carries none: the conversation mode is VILA's code
    config.update(model_max_length=4096, padding_side="right", pad_token="<unk>")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}, indent=2))


def _llm(seed: int):
    import torch
    import transformers as T

    torch.manual_seed(seed)
    config = T.LlamaConfig(hidden_size=LLM_HIDDEN, intermediate_size=LLM_INTER, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, vocab_size=500, max_position_embeddings=4096,
                           rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
    model = T.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.ndim > 1 else None
    return model


def build_tiny_vila(out: Path, seed: int = 0, awq: bool = False) -> Path:
    import torch
    import transformers as T
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    llm_dir, tower_dir, proj_dir = out / "llm", out / "vision_tower", out / "mm_projector"
    _tokenizer(llm_dir)
    llm = _llm(seed)
    if awq:
        llm.config.architectures = ["LlamaForCausalLM"]
        llm.config.save_pretrained(llm_dir)
        write_tinychat_awq(llm, llm_dir / "vila-tiny-w4-g128-awq-v2.pt")
        # as on the Hub: an index naming shards that are not there
        (llm_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    else:
        llm.to(torch.bfloat16).save_pretrained(llm_dir)
    torch.manual_seed(seed + 1)
    vcfg = T.SiglipVisionConfig(hidden_size=V_HIDDEN, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    tower = T.SiglipVisionModel(vcfg).eval()
    vcfg.architectures = ["SiglipVisionModel"]
    vcfg.save_pretrained(tower_dir)
    # transformers 4 names (what VILA1.5 ships): SiglipVisionModel's tensors under vision_model.
    state = {k if k.startswith("vision_model.") else f"vision_model.{k}": v.to(torch.bfloat16).contiguous()
             for k, v in tower.state_dict().items()}
    save_file(state, str(tower_dir / "model.safetensors"), metadata={"format": "pt"})
    (tower_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    proj_dir.mkdir()
    (proj_dir / "config.json").write_text(json.dumps(PROJECTOR_CONFIG, indent=2))
    g = torch.Generator().manual_seed(seed + 2)
    d = 4 * V_HIDDEN
    projector = {
        "layers.1.weight": 1 + 0.1 * torch.randn(d, generator=g), "layers.1.bias": 0.1 * torch.randn(d, generator=g),
        "layers.2.weight": 0.3 * torch.randn(LLM_HIDDEN, d, generator=g),
        "layers.2.bias": 0.1 * torch.randn(LLM_HIDDEN, generator=g),
        "layers.4.weight": 0.3 * torch.randn(LLM_HIDDEN, LLM_HIDDEN, generator=g),
        "layers.4.bias": 0.1 * torch.randn(LLM_HIDDEN, generator=g),
    }
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in projector.items()}, str(proj_dir / "model.safetensors"),
              metadata={"format": "pt"})
    sub = lambda path, d: {"_name_or_path": path, **{k: v for k, v in d.items() if k != "_name_or_path"}}  # noqa: E731
    config = {**TOP_LEVEL,
              "llm_cfg": sub("./llm", json.loads((llm_dir / "config.json").read_text())),
              "vision_tower_cfg": sub("./vision_tower", json.loads((tower_dir / "config.json").read_text())),
              "mm_projector_cfg": PROJECTOR_CONFIG}
    (out / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
    return out


def build_tiny_vila_awq(out: Path, seed: int = 0) -> Path:
    return build_tiny_vila(out, seed, awq=True)


# -- TinyChat v2 AWQ, written the way llm-awq writes it -------------------------------------


def pack_tinychat_v2(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [N, K] -> int16 [N/4, K], following llm-awq qmodule.py pack_intweight step by step."""
    n, k = codes.shape
    w = codes.astype(np.int32)
    w = w.reshape(n, k // 32, 4, 4, 2).transpose(0, 1, 3, 2, 4).reshape(n, k)
    w = w.reshape(n, k // 32, 4, 4, 2).transpose(0, 1, 2, 4, 3).reshape(n, k)
    w = w.reshape(n // 4, 4, k // 64, 64).transpose(0, 2, 1, 3).reshape(n // 4, k // 64, 64, 4)
    packed = w[..., 0] | (w[..., 1] << 4) | (w[..., 2] << 8) | (w[..., 3] << 12)
    return packed.reshape(n // 4, k).astype(np.uint16).view(np.int16)


def write_tinychat_awq(model, path: Path) -> dict[str, dict]:
    """The model's decoder linears as TinyChat v2 WQLinear buffers (RTN INT4, group 128), the rest fp16;
    returns {linear: {"q", "zeros", "scales", "scaled_zeros"}} to compare against."""
    import torch

    from vishwamai_edge.export.awq import LINEARS, quantize_weight

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    truth = {}
    for i in range(model.config.num_hidden_layers):
        for lin in LINEARS:
            name = f"model.layers.{i}.{lin}"
            w = state.pop(f"{name}.weight").float()
            ql = quantize_weight(w, GROUP)
            groups = w.shape[1] // GROUP
            g_pad = -(-groups // 8) * 8
            scales = ql.scales.T.contiguous()  # [groups, out]
            scaled_zeros = (-(scales.float() * ql.zeros.T.float())).half()
            pad = lambda t: torch.cat([t, torch.zeros(g_pad - groups, t.shape[1], dtype=t.dtype)])  # noqa: E731
            state[f"{name}.qweight"] = torch.from_numpy(pack_tinychat_v2(ql.q.numpy()))
            state[f"{name}.scales"] = pad(scales)
            state[f"{name}.scaled_zeros"] = pad(scaled_zeros)
            truth[name] = {"q": ql.q, "zeros": ql.zeros, "scales": ql.scales, "scaled_zeros": scaled_zeros.T}
    torch.save(state, str(path))
    return truth


def tinychat_truth(seed: int = 0) -> dict[str, dict]:
    """What `build_tiny_vila_awq(seed=seed)` quantized: the same model, the same RTN codes."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return write_tinychat_awq(_llm(seed), Path(tmp) / "x-w4-g128-awq-v2.pt")


def tinychat_weight(truth: dict) -> "np.ndarray":
    """The source's own dequantization: q * scales + scaled_zeros, per group."""
    import torch

    g = GROUP
    s = truth["scales"].float().repeat_interleave(g, dim=1)
    z = truth["scaled_zeros"].float().repeat_interleave(g, dim=1)
    return (truth["q"].float() * s + z).to(torch.float16).float().numpy()


# -- the torch reference composite ----------------------------------------------------------


def vila_prompt(question: str, images: int = 1) -> str:
    """conv_vicuna_v1 as VILA's run_vila.py assembles one question: images first, each "<image>\\n"."""
    return vila_conversation([(question, images)], [])


def vila_conversation(questions: list[tuple[str, int]], answers: list[str], eos: str = "</s>") -> str:
    """conv_vicuna_v1 (llava/conversation.py, SeparatorStyle.TWO: sep " ", sep2 "</s>") of user turns
    (text, images shown first) and the assistant's answers between them, ending on "ASSISTANT:"."""
    out = f"{SYSTEM} "
    for i, (question, images) in enumerate(questions):
        out += "USER: " + "<image>\n" * images + question + " ASSISTANT:"
        if i < len(answers):
            out += f" {answers[i]}{eos}"
    return out


TEMPLATE_EOS = "\x00eos\x00"  # stands for the template's own "</s>" while the text is cut up


class SlowLegacyFalse:
    """The slow LlamaTokenizer VILA loads (transformers 4.36, `use_fast=False, legacy=False`) on text with no
    control token in it: the SentencePiece model without its dummy prefix; `start` is a call's first text
    (tokenize(): "\u2581" prepended), `after_control` the text that follows a control token (_tokenize():
    none added; a leading space encoded behind "<unk>", whose pieces are then dropped)."""

    def __init__(self, model_file: Path):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(model_file).read_bytes())
        proto.normalizer_spec.add_dummy_prefix = False  # what legacy=False does to the model
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.unk_length = len(self.sp.encode("<unk>"))

    def after_control(self, text: str) -> list[int]:
        if not text.startswith(("\u2581", " ")):
            return self.sp.encode(text)
        return self.sp.encode("<unk>" + text)[self.unk_length:]

    def start(self, text: str) -> list[int]:
        return self.after_control("\u2581" + text.replace("\u2581", " "))


def vila_ids_typed_as_text(folder: Path, questions: list[tuple[str, int]], answers: list[str]) -> list[int]:
    """VILA's ids of a conversation whose user text holds control-token strings, read as plain text: VILA's
    tokenizer_image_token (each <image> chunk tokenized by its own call, BOS first only in the first), and
    within a chunk the template's "</s>" a control token, the text after it continued without a mark."""
    tok = SlowLegacyFalse(folder / "llm" / "tokenizer.model")
    ids: list[int] = [1]  # <s>
    for c, chunk in enumerate(vila_conversation(questions, answers, eos=TEMPLATE_EOS).split("<image>")):
        if c:
            ids.append(-200)
        for p, part in enumerate(chunk.split(TEMPLATE_EOS)):
            if p:
                ids += [2] + (tok.after_control(part) if part else [])  # </s>
            elif part:
                ids += tok.start(part)
    return ids


class VilaReference:
    """Our torch reference (tower at the selected layer + mlp_downsample) and the LLM in transformers,
    fed as VILA feeds them: the prompt split at <image>, each piece tokenized alone, rows spliced in."""

    def __init__(self, folder: Path, llm_dir: Path | None = None):
        import torch
        import transformers as T

        from vishwamai_edge.export.vila import load_vila_vision

        self.torch = torch
        self.vision = load_vila_vision(folder)
        llm_dir = llm_dir or folder / "llm"
        self.llm = T.LlamaForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
        # as VILA's builder loads it (llava/model/language_model/builder.py): the slow tokenizer, legacy=False
        self.tokenizer = T.AutoTokenizer.from_pretrained(folder / "llm", use_fast=False, legacy=False)

    def ids(self, prompt: str) -> list[int]:
        chunks = prompt.split("<image>")
        ids = self.tokenizer(chunks[0])["input_ids"]
        for chunk in chunks[1:]:
            ids += [-200] + (self.tokenizer(chunk, add_special_tokens=False)["input_ids"] if chunk else [])
        return ids

    def last_logits(self, prompt: str, images: list[np.ndarray]) -> np.ndarray:
        from vishwamai_edge.runtime.preprocess import preprocess

        torch = self.torch
        ids = self.ids(prompt)
        pixels = torch.from_numpy(np.stack([preprocess(im, self.vision.spec) for im in images]))
        with torch.no_grad():
            rows = self.vision.module(pixels)
            embed = self.llm.get_input_embeddings()
            parts, start, k = [], 0, 0
            for pos in [i for i, t in enumerate(ids) if t == -200] + [len(ids)]:
                if pos > start:
                    parts.append(embed(torch.tensor([ids[start:pos]]))[0])
                if pos < len(ids):
                    parts.append(rows[k])
                    k += 1
                start = pos + 1
            out = self.llm(inputs_embeds=torch.cat(parts)[None])
        return out.logits[0, -1].numpy()
