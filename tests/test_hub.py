"""Sharing through the Hub, end to end, against the loopback Hub of tests/hub_server.py.

huggingface_hub reads HF_ENDPOINT when it is imported, and this process imported it long ago, so every push
and every load runs in a fresh interpreter with HF_ENDPOINT/HF_TOKEN/HF_HOME pointing at the loopback server:
which is also what "loads in a fresh process" asks for. Scores are compared exactly (float32 values survive
the JSON round trip), not approximately.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import HubServer

from seqrec_hf import ItemTokenizer, SeqRecForNextItemPrediction
from seqrec_hf.hub import files_to_push
from seqrec_hf.modelcard import extract_python_snippets, ranking_metrics
from seqrec_hf.train import load_recipe, train

pytestmark = pytest.mark.slow

BAD_TOKEN = "hf_thisIsAWrongTokenThatMustNeverBePrinted42"

# Shared by the scripts run in fresh interpreters: their arguments come as JSON in argv[1] and their results
# go back as one "RESULT {...}" line on stdout.
HEADER = """
import json, sys
ARGS = json.loads(sys.argv[1])

def scores(model, tokenizer):
    import torch
    h = ARGS["history"]
    batch = tokenizer(
        [h["items"]], timestamps=[h["timestamps"]], query_timestamps=[h["query_timestamp"]], return_tensors="pt"
    )
    with torch.no_grad():
        return model(**batch, logits_to_keep=1).logits[0, -1].tolist()

def emit(**values):
    print("RESULT " + json.dumps(values), flush=True)
"""
BLOCK_SEQREC = """
import sys
sys.modules["seqrec_hf"] = None  # this interpreter cannot import seqrec_hf: only the code on the Hub can run
try:
    import seqrec_hf  # noqa: F401
    raise SystemExit("seqrec_hf should not be importable here")
except ImportError:
    pass
"""


# ----------------------------------------------------------------------------------------------------------
# Fixtures: a trained checkpoint, a second version of it, and the environment of a fresh process
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real (tiny) training output folder: weights, tokenizer, code, metrics.json, log, curve, card."""
    out = tmp_path_factory.mktemp("hub") / "time_aware"
    overrides = dict(
        data_path="synthetic",
        synthetic_num_users=200,
        synthetic_num_items=100,
        batch_size=16,
        max_steps=8,
        eval_every_steps=4,
        logging_steps=2,
        hidden_size=32,
        intermediate_size=64,
        use_time_bias=True,
        output_dir=str(out),
    )
    train(load_recipe(None, overrides))
    assert (out / "checkpoints").is_dir() and (out / "best_model").is_dir()  # leftovers the push must skip
    return out


@pytest.fixture(scope="module")
def checkpoint_v2(checkpoint, tmp_path_factory) -> Path:
    """The same checkpoint with different weights (a second version to push to a branch)."""
    out = tmp_path_factory.mktemp("hub") / "time_aware_v2"
    shutil.copytree(checkpoint, out, ignore=shutil.ignore_patterns("checkpoints", "best_model"))
    model = SeqRecForNextItemPrediction.from_pretrained(checkpoint)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def history(checkpoint) -> dict:
    items = ItemTokenizer.from_pretrained(checkpoint).convert_ids_to_items([2, 5, 9, 3, 7])
    return {"items": items, "timestamps": [1700000000 + 600 * i for i in range(5)], "query_timestamp": 1700004000}


def local_scores(folder: Path, history: dict) -> list[float]:
    tokenizer = ItemTokenizer.from_pretrained(folder)
    model = SeqRecForNextItemPrediction.from_pretrained(folder).eval()
    batch = tokenizer(
        [history["items"]],
        timestamps=[history["timestamps"]],
        query_timestamps=[history["query_timestamp"]],
        return_tensors="pt",
    )
    with torch.no_grad():
        return model(**batch, logits_to_keep=1).logits[0, -1].tolist()


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def hub_env(hub: HubServer, home: Path, token: str | None = None) -> dict[str, str]:
    """The environment of a fresh interpreter talking to the loopback Hub (and nothing else)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_TOKEN=token if token is not None else hub.token,
        HF_HOME=str(home),
        HF_HUB_DISABLE_XET="1",  # the loopback Hub speaks classic LFS, not xet
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
    )
    return env


def run_fresh(script: str, args: dict, env: dict, cwd: Path, expect_ok: bool = True) -> tuple[dict, str]:
    """Run `script` in a new interpreter; returns (its RESULT dict, stdout + stderr). Never leaks the token."""
    return run_python(["-c", HEADER + script, json.dumps(args)], env, cwd, expect_ok)


def run_python(argv: list[str], env: dict, cwd: Path, expect_ok: bool = True) -> tuple[dict, str]:
    """`python *argv` with `env`; returns (the RESULT dict it printed, if any; stdout + stderr)."""
    proc = subprocess.run(
        [sys.executable, *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = proc.stdout + proc.stderr
    for secret in {env.get("HF_TOKEN"), BAD_TOKEN} - {None, ""}:
        assert secret not in output, "a token was printed"
    if expect_ok:
        assert proc.returncode == 0, output[-4000:]
    results = [line[len("RESULT ") :] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return (json.loads(results[-1]) if results else {}), output


# ----------------------------------------------------------------------------------------------------------
# Regular uploads (contents inside the commit): push with the CLI, load in fresh processes
# ----------------------------------------------------------------------------------------------------------

PUSH_CLI = """
from seqrec_hf.cli import main
codes = [main(["push", ARGS["folder"], "--repo-id", ARGS["repo_id"], *extra]) for extra in ARGS["runs"]]
emit(codes=codes)
"""


@pytest.fixture(scope="module")
def regular_hub(checkpoint, tmp_path_factory):
    """A loopback Hub where `org/seqrec-demo` was pushed once with `seqrec-hf push` (regular uploads)."""
    with HubServer(upload_mode="regular") as hub:
        home = tmp_path_factory.mktemp("hf_home")
        env = hub_env(hub, home)
        result, _ = run_fresh(
            PUSH_CLI, {"folder": str(checkpoint), "repo_id": "org/seqrec-demo", "runs": [[]]}, env, home
        )
        assert result["codes"] == [0]
        yield hub, env, home


def test_push_uploads_the_checkpoint_and_skips_training_leftovers(regular_hub, checkpoint):
    hub, _, _ = regular_hub
    files = hub.files("org/seqrec-demo")
    expected = set(files_to_push(checkpoint)) | {".gitattributes"}
    assert set(files) == expected
    for name in ("model.safetensors", "config.json", "vocab.json", "tokenizer_config.json", "modeling_seqrec.py"):
        assert name in files
    for name in ("configuration_seqrec.py", "tokenization_seqrec.py", "README.md", "metrics.json"):
        assert name in files
    assert "train_log.jsonl" in files
    assert ("training_curve.png" in files) == (checkpoint / "training_curve.png").is_file()
    assert not any(path.startswith(("checkpoints/", "best_model/")) for path in files)
    assert files["model.safetensors"].content == (checkpoint / "model.safetensors").read_bytes()
    assert not any(stored.lfs for stored in files.values())  # regular path: everything inside the commit
    # the card on the Hub is rendered for the repository; the local one is left as it was
    assert 'model="org/seqrec-demo"' in files["README.md"].content.decode()
    assert "org/seqrec-demo" not in (checkpoint / "README.md").read_text()


LOAD_WITH_SEQREC = """
import seqrec_hf  # noqa: F401
from huggingface_hub import ModelCard
from transformers import pipeline
from seqrec_hf import ItemTokenizer, SeqRecForNextItemPrediction

repo = ARGS["repo_id"]
model = SeqRecForNextItemPrediction.from_pretrained(repo).eval()
tokenizer = ItemTokenizer.from_pretrained(repo)
rec = pipeline("next-item-recommendation", model=repo)
card = ModelCard.load(repo)
emit(
    scores=scores(model, tokenizer),
    top=rec(ARGS["history"], top_k=5),
    card_results=[
        [r.dataset_split, r.metric_type, r.metric_value, r.dataset_config, r.dataset_args]
        for r in card.data.eval_results
    ],
    tags=card.data.tags,
    library=card.data.library_name,
)
"""


def test_from_pretrained_in_a_fresh_process_gives_identical_scores(regular_hub, checkpoint, history):
    hub, env, home = regular_hub
    result, _ = run_fresh(LOAD_WITH_SEQREC, {"repo_id": "org/seqrec-demo", "history": history}, env, home)
    assert result["scores"] == local_scores(checkpoint, history)  # exactly, not approximately

    from transformers import pipeline

    local_top = pipeline("next-item-recommendation", model=str(checkpoint))(history, top_k=5)
    assert [r["item"] for r in result["top"]] == [r["item"] for r in local_top]
    assert [r["score"] for r in result["top"]] == [r["score"] for r in local_top]
    assert not set(history["items"]) & {r["item"] for r in result["top"]}

    # the card, loaded from the Hub with ModelCard.load, holds every ranking metric of metrics.json
    metrics = json.loads((checkpoint / "metrics.json").read_text())
    loaded = {(split, name): value for split, name, value, _, _ in result["card_results"]}
    expected = {(s, n): v for s in ("test", "validation") for n, v in ranking_metrics(metrics[s]).items()}
    assert loaded == expected and len(expected) >= 16
    for _, _, _, config, args in result["card_results"]:
        assert config == "leave_one_out" and args["ranking"] == "full" and args["history_excluded"] is True
    assert {"recommendation", "sequential-recommendation"} <= set(result["tags"])
    assert result["library"] == "seqrec-hf"


LOAD_REMOTE_CODE = (
    BLOCK_SEQREC
    + """
from transformers import AutoModelForCausalLM, AutoTokenizer

repo = ARGS["repo_id"]
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
emit(
    scores=scores(model, tokenizer),
    model_module=type(model).__module__,
    tokenizer_module=type(tokenizer).__module__,
    seqrec_hf_loaded=sys.modules.get("seqrec_hf") is not None,
)
"""
)


def test_trust_remote_code_loads_where_seqrec_hf_cannot_be_imported(regular_hub, checkpoint, history):
    hub, env, home = regular_hub
    result, _ = run_fresh(LOAD_REMOTE_CODE, {"repo_id": "org/seqrec-demo", "history": history}, env, home)
    assert result["model_module"].startswith("transformers_modules.")
    assert result["tokenizer_module"].startswith("transformers_modules.")
    assert result["seqrec_hf_loaded"] is False
    assert result["scores"] == local_scores(checkpoint, history)


def test_the_card_snippets_run_against_the_hub(regular_hub, checkpoint, tmp_path):
    hub, env, _ = regular_hub
    card_text = hub.files("org/seqrec-demo")["README.md"].content.decode()
    pipeline_snippet, remote_code_snippet = extract_python_snippets(card_text)
    vocab = json.loads((checkpoint / "vocab.json").read_text())
    assert "timestamps" in pipeline_snippet and "query_timestamp" in pipeline_snippet  # a time-aware model
    quoted = [item for item in vocab if not item.startswith("[") and f'"{item}"' in pipeline_snippet]
    assert len(quoted) == 3  # real item ids of the checkpoint's catalog, not placeholders

    # As a user runs them: the pipeline one with seqrec-hf installed, the other where it cannot be imported.
    (tmp_path / "use_pipeline.py").write_text(pipeline_snippet + "\n")
    (tmp_path / "use_remote_code.py").write_text(BLOCK_SEQREC + remote_code_snippet + "\n")
    _, output = run_python(["use_pipeline.py"], env, tmp_path)
    printed = [line.split() for line in output.splitlines() if line.split() and line.split()[0] in vocab]
    assert len(printed) == 10 and all(float(score) == float(score) for _, score in printed)
    assert not {item for item, _ in printed} & set(quoted)  # history excluded
    _, output = run_python(["use_remote_code.py"], env, tmp_path)
    recommended = json.loads(output.strip().splitlines()[-1].replace("'", '"'))
    assert len(recommended) == 10 and set(recommended) <= set(vocab)


# ----------------------------------------------------------------------------------------------------------
# LFS uploads (HF_HUB_DISABLE_XET=1): weights through the LFS batch API; branches; idempotent re-push
# ----------------------------------------------------------------------------------------------------------

LOAD_REVISIONS = """
from seqrec_hf import ItemTokenizer, SeqRecForNextItemPrediction

out = {}
for revision in ARGS["revisions"]:
    model = SeqRecForNextItemPrediction.from_pretrained(ARGS["repo_id"], revision=revision).eval()
    out[revision] = scores(model, ItemTokenizer.from_pretrained(ARGS["repo_id"], revision=revision))
emit(**out)
"""


def test_lfs_push_revisions_and_idempotent_repush(checkpoint, checkpoint_v2, history, tmp_path):
    repo = "org/seqrec-lfs"
    with HubServer(upload_mode="lfs") as hub:
        env = hub_env(hub, tmp_path)
        runs = [["--private"], [], ["--revision", "v2", "--commit-message", "weights v2"]]
        result, _ = run_fresh(PUSH_CLI, {"folder": str(checkpoint), "repo_id": repo, "runs": runs[:2]}, env, tmp_path)
        assert result["codes"] == [0, 0]
        first = hub.head(repo)
        assert hub.repos[repo].private
        assert len(hub.history(repo)) == 2  # the repository's initial commit + ONE push: the second was a no-op
        lfs_puts = [path for method, path, _ in hub.requests if method == "PUT"]
        files = hub.files(repo)
        binary = [name for name in ("model.safetensors", "training_curve.png") if name in files]
        assert len(lfs_puts) == len(binary)  # weights (and the curve), each uploaded once
        assert all(files[name].lfs for name in binary) and "model.safetensors" in binary
        assert not files["config.json"].lfs and not files["README.md"].lfs
        assert files["model.safetensors"].content == (checkpoint / "model.safetensors").read_bytes()

        result, _ = run_fresh(
            PUSH_CLI, {"folder": str(checkpoint_v2), "repo_id": repo, "runs": runs[2:]}, env, tmp_path
        )
        assert result["codes"] == [0]
        assert hub.head(repo) == first  # main untouched
        assert hub.history(repo, "v2")[0].message == "weights v2" and hub.history(repo, "v2")[1].oid == first
        card_v2 = hub.files(repo, "v2")["README.md"].content.decode()
        assert 'revision="v2"' in card_v2

        args = {"repo_id": repo, "history": history, "revisions": ["main", "v2", first]}
        result, _ = run_fresh(LOAD_REVISIONS, args, env, tmp_path)
    v1_scores, v2_scores = local_scores(checkpoint, history), local_scores(checkpoint_v2, history)
    assert v1_scores != v2_scores
    assert result["main"] == v1_scores and result[first] == v1_scores
    assert result["v2"] == v2_scores


# ----------------------------------------------------------------------------------------------------------
# transformers' own push paths: PreTrainedModel/Tokenizer.push_to_hub and Trainer.push_to_hub
# ----------------------------------------------------------------------------------------------------------

TRANSFORMERS_PUSH = """
import torch
from transformers import Trainer, TrainingArguments, pipeline
import seqrec_hf  # noqa: F401
from seqrec_hf import ItemTokenizer, SeqRecForNextItemPrediction
from seqrec_hf.data import SeqRecCollator

folder = ARGS["folder"]
tokenizer = ItemTokenizer.from_pretrained(folder)
model = SeqRecForNextItemPrediction.from_pretrained(folder).eval()
model.push_to_hub("org/mixin", commit_message="model")
tokenizer.push_to_hub("org/mixin", commit_message="tokenizer")
mixin = SeqRecForNextItemPrediction.from_pretrained("org/mixin").eval()
mixin_top = pipeline("next-item-recommendation", model="org/mixin")(ARGS["history"], top_k=5)

h = ARGS["history"]
rows = [{"item_ids": h["items"][: 2 + i % 4], "timestamps": h["timestamps"][: 2 + i % 4]} for i in range(16)]
args = TrainingArguments(
    output_dir=ARGS["output_dir"], push_to_hub=True, hub_model_id="org/trainer", max_steps=2,
    per_device_train_batch_size=8, save_strategy="no", report_to="none", use_cpu=True,
    remove_unused_columns=False, disable_tqdm=True, logging_strategy="no",
)
trainer = Trainer(
    model=SeqRecForNextItemPrediction.from_pretrained(folder), args=args, train_dataset=rows,
    data_collator=SeqRecCollator(tokenizer), processing_class=tokenizer,
)
trainer.train()
trainer.push_to_hub(commit_message="trainer")
trained = trainer.model.eval()
pulled = SeqRecForNextItemPrediction.from_pretrained("org/trainer").eval()
emit(
    mixin=scores(mixin, ItemTokenizer.from_pretrained("org/mixin")),
    mixin_top=mixin_top,
    trained=scores(trained, tokenizer),
    pulled=scores(pulled, ItemTokenizer.from_pretrained("org/trainer")),
)
"""


def test_transformers_push_to_hub_and_trainer_push_to_hub(checkpoint, history, tmp_path):
    with HubServer(upload_mode="lfs") as hub:
        env = hub_env(hub, tmp_path)
        args = {"folder": str(checkpoint), "history": history, "output_dir": str(tmp_path / "trainer_out")}
        result, _ = run_fresh(TRANSFORMERS_PUSH, args, env, tmp_path)
        mixin_files, trainer_files = hub.files("org/mixin"), hub.files("org/trainer")
    needed = {"model.safetensors", "config.json", "modeling_seqrec.py", "configuration_seqrec.py"}
    needed |= {"vocab.json", "tokenizer_config.json", "tokenization_seqrec.py"}
    assert needed <= set(mixin_files) and needed <= set(trainer_files)
    assert "README.md" in trainer_files  # the Trainer's own card
    assert result["mixin"] == local_scores(checkpoint, history)
    assert len(result["mixin_top"]) == 5
    assert result["pulled"] == result["trained"]  # what the Trainer pushed is what it trained
    assert result["trained"] != result["mixin"]  # ... and it did train


# ----------------------------------------------------------------------------------------------------------
# Failures: a Hub that breaks mid-upload, a missing or wrong token
# ----------------------------------------------------------------------------------------------------------


def test_server_error_mid_upload_is_clear_and_leaves_the_folder_intact(checkpoint, tmp_path):
    before = folder_digest(checkpoint)
    with HubServer(upload_mode="lfs") as hub:
        hub.fail_next["commit"] = 1  # the LFS objects get uploaded, then the commit answers HTTP 500
        env = hub_env(hub, tmp_path)
        runs = [[], []]  # fails, then the same command again succeeds
        result, output = run_fresh(
            PUSH_CLI, {"folder": str(checkpoint), "repo_id": "org/flaky", "runs": runs}, env, tmp_path
        )
        assert ("POST", "/api/models/org/flaky/commit/main", 500) in hub.requests
        assert any(method == "PUT" and status == 200 for method, _, status in hub.requests)  # mid-upload
        history_after = [c.message for c in hub.history("org/flaky")]
    assert result["codes"] == [1, 0]
    error = next(line for line in output.splitlines() if line.startswith("seqrec-hf push: error:"))
    assert "org/flaky" in error and "HTTP 500" in error and "run the same push again" in error
    assert str(checkpoint) in error and "unchanged" in error
    assert "Traceback" not in output
    assert folder_digest(checkpoint) == before
    assert history_after == [f"Upload {checkpoint.name} with seqrec-hf", "initial commit"]  # no partial commit


TOKEN_ERRORS = """
import os
from seqrec_hf.cli import main
from seqrec_hf.hub import HubPushError, push_checkpoint

codes = [main(["push", ARGS["folder"], "--repo-id", "org/secret"])]  # HF_TOKEN is wrong
try:
    push_checkpoint(ARGS["folder"], "org/secret", token=ARGS["bad"])
except HubPushError as err:
    api_error = str(err)
del os.environ["HF_TOKEN"]  # and now there is no token at all
codes.append(main(["push", ARGS["folder"], "--repo-id", "org/secret"]))
emit(codes=codes, api_error=api_error)
"""


def test_missing_or_invalid_token_is_clear_and_never_printed(checkpoint, tmp_path):
    with HubServer(upload_mode="regular") as hub:
        env = hub_env(hub, tmp_path, token=BAD_TOKEN)
        result, output = run_fresh(TOKEN_ERRORS, {"folder": str(checkpoint), "bad": BAD_TOKEN}, env, tmp_path)
        assert any(status == 401 for _, _, status in hub.requests)  # the server really refused the token
        assert "org/secret" not in hub.repos
    assert result["codes"] == [1, 1]
    errors = [line for line in output.splitlines() if line.startswith("seqrec-hf push: error:")]
    assert len(errors) == 2
    assert "authentication failed" in errors[0] and "org/secret" in errors[0] and "HF_TOKEN" in errors[0]
    assert "authentication failed" in result["api_error"] and BAD_TOKEN not in result["api_error"]
    assert "no Hugging Face token found" in errors[1] and "hf auth login" in errors[1]
    assert BAD_TOKEN not in output  # (run_fresh checks this for every process too)
