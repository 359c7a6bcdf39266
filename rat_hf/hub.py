"""Model cards and Hub uploads for rat_hf models.

    card = model_card(model, repo_id="me/rat-tiny", command="python recipes/pretrain_rat.py ...", metrics={"loss": 2.3})
    save_for_hub(model, "out/hub", tokenizer=tokenizer, card=card)  # save_pretrained + tokenizer + README, checked
    push_folder_to_hub("out/hub", "me/rat-tiny")                    # create the repo (if needed), upload the folder

The folder loads without rat_hf: `import rat_hf` registers the classes for the Auto classes, so `save_pretrained`
writes `auto_map` into config.json and copies the modeling/configuration files next to the weights, and
`AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)` works anywhere. The card templates are jinja files
with YAML front matter (`model_cards/rat.md`, `model_cards/rxt.md`), filled through `huggingface_hub.ModelCard`.
The endpoint comes from `HF_ENDPOINT` at call time. A failed push raises `HubPushError`, whose message says what
failed and where, never contains the token, and leaves the local folder as it was.
"""

import json
import os
import re
import shlex
import sys
from pathlib import Path

import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants

TEMPLATES = {"rat": "rat.md", "rxt": "rxt.md"}
# A source checkout (or editable install) has model_cards/ beside the package; a wheel installs the same files as
# data under <prefix>/share/rat_hf/model_cards (pyproject's data-files).
TEMPLATE_DIRS = (
    Path(__file__).resolve().parents[1] / "model_cards",
    Path(sys.prefix) / "share" / "rat_hf" / "model_cards",
)
TAGS = ("rat_hf", "custom_code", "text-generation")
# A Trainer's output_dir also holds checkpoints, TensorBoard runs and pickled arguments: not for the model repo.
IGNORE_PATTERNS = ("checkpoint-*/**", "runs/**", "training_args.bin", "*.pt", "*.pth")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{8,}")
# `--token X`, `--hub-token=X`, `HF_TOKEN=X`, `hub_token: X` (not `pad_token`, `max_tokens`, `tokenizer`)
_TOKEN_ARG = re.compile(r"((?<!\w)(?:(?:hub|hf|auth|api|access)[_-])?token[\"']?(?:\s*[=:]\s*|\s+))"
                        r"(?:\"[^\"]*\"|'[^']*'|[^\s\"',}]+)", re.IGNORECASE)


class HubPushError(RuntimeError):
    """A push to the Hub failed; the local folder is complete and untouched."""


class IncompleteHubFolderError(RuntimeError):
    """A folder meant for the Hub lacks files that `from_pretrained(..., trust_remote_code=True)` needs."""


def redact(text: str, token: str | None = None, *, arguments: bool = False) -> str:
    """`text` without `token`, $HF_TOKEN or `hf_...` strings; with `arguments=True` also without the value of
    any `token` / `hub_token` / `hf_token` option or key (for commands and configs)."""
    for secret in (token, os.environ.get("HF_TOKEN")):
        if secret:
            text = text.replace(secret, "***")
    text = _HF_TOKEN.sub("***", text)
    return _TOKEN_ARG.sub(r"\1***", text) if arguments else text


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _template_for(model_type: str) -> Path:
    if model_type not in TEMPLATES:
        raise ValueError(f"no model card template for model_type {model_type!r}; known: {sorted(TEMPLATES)}")
    for folder in TEMPLATE_DIRS:
        if (path := folder / TEMPLATES[model_type]).is_file():
            return path
    raise FileNotFoundError(f"model card template {TEMPLATES[model_type]} not found in {[str(d) for d in TEMPLATE_DIRS]}")


def model_card(
    model,
    *,
    template=None,
    repo_id: str | None = None,
    command=None,
    config=None,
    metrics: dict | None = None,
    datasets=None,
    base_model: str | None = None,
    license: str = "mit",
    extra_tags=(),
) -> ModelCard:
    """The Hub card of `model` (a RAT or RxT model), from `model_cards/<model_type>.md` unless `template` (a path).

    `command`: the exact training command (a string, or an argv list); `config`: the recipe config (a dict, YAML/JSON
    text, or a `pathlib.Path` to a config file); `metrics`: final metrics, name -> value. Tokens in the command or config are
    replaced by `***`.
    """
    model_type = model.config.model_type
    template = Path(template) if template is not None else _template_for(model_type)
    if isinstance(command, (list, tuple)):
        command = shlex.join(map(str, command))
    if isinstance(config, Path):
        config = config.read_text()
    if isinstance(config, dict):
        config = yaml.safe_dump(config, sort_keys=False).strip()
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys([*TAGS, model_type, *extra_tags])),
        datasets=list(datasets) if datasets else None,
        base_model=base_model,
    )
    n_params = model.num_parameters()
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=repo_id.split("/")[-1] if repo_id else type(model).__name__,
        repo_id=repo_id or "<user>/<repo>",
        architecture=type(model).__name__,
        model_type=model_type,
        num_parameters=f"{n_params:,}",
        num_parameters_human=_human(n_params),
        command=redact(command, arguments=True) if command else None,
        recipe_config=redact(config.strip(), arguments=True) if config else None,
        recipe_config_language="json" if config and config.lstrip().startswith("{") else "yaml",
        metrics=[(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in (metrics or {}).items()],
        model_config=model.config.to_json_string(use_diff=True).strip(),
    )


def check_hub_folder(output_dir, *, tokenizer: bool = False, readme: bool = True) -> None:
    """Raise `IncompleteHubFolderError` naming every missing piece: config.json with auto_map, the safetensors
    weights, the .py files auto_map points at, README.md (`readme`) and tokenizer_config.json (`tokenizer`)."""
    folder, missing = Path(output_dir), []
    config_path = folder / "config.json"
    auto_map = json.loads(config_path.read_text()).get("auto_map", {}) if config_path.is_file() else {}
    if not config_path.is_file():
        missing.append("config.json")
    elif "AutoConfig" not in auto_map or not any(k.startswith("AutoModel") for k in auto_map):
        missing.append("auto_map (AutoConfig + an AutoModel class) in config.json: `import rat_hf` before saving "
                       "registers the classes for remote code")
    for ref in auto_map.values():
        for name in ref if isinstance(ref, list) else [ref]:
            if name:
                module = name.split("--")[-1].rsplit(".", 1)[0]
                if not (folder / f"{module.replace('.', '/')}.py").is_file():
                    missing.append(f"{module}.py (remote code named in auto_map)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing += [shard for shard in shards if not (folder / shard).is_file()]
    elif not (folder / "model.safetensors").is_file():
        missing.append("model.safetensors")
    if tokenizer and not (folder / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    if readme and not (folder / "README.md").is_file():
        missing.append("README.md")
    if missing:
        raise IncompleteHubFolderError(f"{folder} is not ready for the Hub; missing: " + "; ".join(dict.fromkeys(missing)))


def save_for_hub(model, output_dir, *, tokenizer=None, card: ModelCard | None = None) -> Path:
    """`save_pretrained` (safetensors + remote code), the tokenizer and README.md into `output_dir`, then checked."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (card if card is not None else model_card(model)).save(folder / "README.md")
    check_hub_folder(folder, tokenizer=tokenizer is not None)
    return folder


def _reason(err: Exception) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        return "authentication failed (HTTP 401): the Hub rejected the token; check HF_TOKEN or `hf auth login`"
    if status == 403:
        return "permission denied (HTTP 403): the token cannot write to this repository"
    if status == 404:
        return "not found (HTTP 404): the repository or the endpoint does not exist"
    if status is not None:
        return f"HTTP {status}: {err}"
    return f"could not reach the Hub ({type(err).__name__}: {err})"


def push_folder_to_hub(
    output_dir,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload rat_hf model",
    endpoint: str | None = None,
    ignore_patterns=IGNORE_PATTERNS,
):
    """Create `repo_id` if needed and upload the (checked) folder in one go; returns the `CommitInfo` (a str: the
    commit URL; `.oid`: the commit sha). `token` defaults to the client's (HF_TOKEN or `hf auth login`); a `repo_id`
    without a namespace goes to the token's user. Trainer leftovers (`ignore_patterns`) stay local."""
    folder = Path(output_dir)
    check_hub_folder(folder, readme=False)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    step = f"create the repository {repo_id}"
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        step = f"upload {folder} to {repo_id}"
        return api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message,
                                 ignore_patterns=list(ignore_patterns or ()))
    except Exception as err:
        message = (f"Hub push failed: could not {step} at {endpoint}: {_reason(err)}. The local save in {folder} is "
                   f"complete and untouched; push it again with push_folder_to_hub({str(folder)!r}, {repo_id!r}).")
        # `from None`: the original exception's text may carry the token; the redacted message says what failed
        raise HubPushError(redact(message, token)) from None


def push_to_hub(model, repo_id: str, output_dir, *, tokenizer=None, card: ModelCard | None = None, **push_kwargs):
    """`save_for_hub` then `push_folder_to_hub`: the folder is complete on disk before anything is sent."""
    save_for_hub(model, output_dir, tokenizer=tokenizer, card=card)
    return push_folder_to_hub(output_dir, repo_id, **push_kwargs)
