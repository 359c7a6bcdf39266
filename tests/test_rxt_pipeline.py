"""The newcomer's path end to end: `recipes/rxt_pipeline.py --preset tiny` trains a tiny RxT through the curriculum,
then a `ReactiveSession` and `rat-chat`'s engine (`ChatInterface`) with the result remember a fact across turns
(memory-recall episodes at distance 1: above chance, and lower with the memory reset). Also the driver's loud
handling of a missing stage's recipe."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")
from rat_hf.recipes.rxt_pipeline import REPO_ROOT, STAGES, main, parse_pipeline, run_pipeline, stage_argv  # noqa: E402

# The recall check runs the preset exactly as documented (about 5 minutes on 2 cores): opt in with RAT_HF_SLOW_TESTS=1.
# By default the pipeline's mechanics run with a few steps per stage and the recall check is skipped (visibly).
SLOW = os.environ.get("RAT_HF_SLOW_TESTS") == "1"
QUIET = [x for s in STAGES for x in ("--set", f"{s}.disable_tqdm=true")]
FAST = [] if SLOW else [
    "--set", "pretrain.max_steps=6", "--set", "pretrain.recall_conversations=60",
    "--set", "sft.max_steps=4", "--set", "sft.recall_conversations=60",
    "--set", "memattn.max_steps=3", "--set", "memattn.recall_conversations=40",
    "--set", "smat.eval_conversations=8", "--set", "smat.max_steps=8", "--set", "smat.recall_conversations=200",
    "--set", "mrl.curriculum_steps=[1,1]", "--set", "mrl.recall_conversations=16"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("rxt_pipeline")
    return root, run_pipeline(["--preset", "tiny", "--output_root", str(root), *FAST, *QUIET])


def test_the_tiny_pipeline_runs_every_stage_in_order_and_records_wall_times(pipeline):
    root, summary = pipeline
    written = json.loads((root / "pipeline.json").read_text())
    assert [r["stage"] for r in written["stages"]] == list(STAGES)
    assert all(r["status"] == "done" and r["wall_s"] > 0 for r in written["stages"]), written["stages"]
    # each stage continues from the previous stage's checkpoint
    froms = [r["from"] for r in written["stages"]]
    assert froms == [None] + [str(root / s) for s in STAGES[:-1]]
    assert written["final_model"] == str(root / "mrl") and (root / "final" / "config.json").is_file()
    assert written["missing"] == []


@pytest.mark.skipif(not SLOW, reason="runs the preset as documented (about 5 minutes): set RAT_HF_SLOW_TESTS=1")
def test_the_result_remembers_a_fact_across_turns_in_a_session(pipeline):
    """Held-out memory-recall episodes at distance 1 (fact, one distractor, question): told through
    `ReactiveSession.remember` and asked with `interact`, recall is above chance and drops with the memory reset;
    through `ChatInterface` (what `rat-chat` runs: the model answers every turn itself and its own answers are
    written), it recalls as well."""
    from transformers import AutoTokenizer

    from rat_hf.chat import ChatInterface
    from rat_hf.data import memory_recall_dataset
    from rat_hf.data.interactions import turns
    from rat_hf.models.rxt import RxTForCausalLM
    from rat_hf.reactive import ReactiveSession

    root, _ = pipeline
    model = RxTForCausalLM.from_pretrained(root / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "final")
    episodes = list(memory_recall_dataset(120, 1, seed=777))  # seeds the recipes never train on
    hits = {"memory": 0, "reset": 0, "chat": 0}
    chat = ChatInterface(model, tokenizer, temperature=0, max_new_tokens=8)
    for record in episodes:
        *told, (question, answer) = turns(record)
        for mode in ("memory", "reset"):
            with ReactiveSession(model, tokenizer, background=False, max_new_tokens=8, do_sample=False) as session:
                if mode == "memory":
                    for q, a in told:
                        session.remember(q, a)
                hits[mode] += session.interact(question).strip() == answer
        chat.clear()
        for q, _ in told:
            chat.generate_response(q)
        hits["chat"] += chat.generate_response(question).strip() == answer
    recall = {k: v / len(episodes) for k, v in hits.items()}
    print(f"recall one turn back over {len(episodes)} held-out conversations: {recall}")
    # chance: the best memoryless guess per attribute (1 in 10 for color/city/pet, 1 in 99 number, 1 in 9000 code)
    # averages ~0.06 over the five attributes. Measured with the preset (seed 0): 0.65 with the memory, 0.01 reset,
    # 0.65 through the chat interface (0.45 / 0.44 with 32 SMAT episodes a step; 0.34 / 0.31 before the session
    # tokenized turns as training does). Other seeds: 0.27-0.56 (recipes/configs/rxt_pipeline_tiny.yaml).
    assert recall["memory"] >= 0.4, recall
    assert recall["memory"] >= recall["reset"] + 0.3, recall
    assert recall["chat"] >= 0.4, recall


def test_a_missing_recipe_is_skipped_loudly_and_the_exit_status_says_so(tmp_path, capsys, pipeline):
    """A stage whose recipe file does not exist: an ERROR line, `missing` in pipeline.json, exit status 1; the stages
    after it continue from the last model made."""
    root, _ = pipeline
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    shutil.copy(REPO_ROOT / "recipes" / "rxt_memattn.py", recipes / "rxt_memattn.py")  # smat is missing
    out = tmp_path / "out"
    status = main(["--stages", "memattn,smat", "--recipes_dir", str(recipes), "--model_name_or_path",
                   str(root / "sft"), "--output_root", str(out), "--set", "memattn.max_steps=1",
                   "--set", "memattn.recall_conversations=16", "--set", "memattn.use_cpu=true",
                   "--set", "memattn.report_to=none", "--set", "memattn.disable_tqdm=true"])
    assert status == 1
    assert "ERROR" in capsys.readouterr().err
    written = json.loads((out / "pipeline.json").read_text())
    assert [(r["stage"], r["status"]) for r in written["stages"]] == [("memattn", "done"), ("smat", "missing")]
    assert written["missing"] == ["smat"] and written["final_model"] == str(out / "memattn")


def test_arguments_are_checked_and_forwarded(tmp_path):
    with pytest.raises(ValueError, match="--stages"):
        parse_pipeline(["--stages", "pretrain,nope"])
    with pytest.raises(ValueError, match="--model_name_or_path"):
        parse_pipeline(["--stages", "smat,mrl"])
    with pytest.raises(ValueError, match="STAGE.KEY=VALUE"):
        parse_pipeline(["--set", "max_steps=3"])
    with pytest.raises(ValueError, match="stages.sft.output_dir"):
        stage_argv("sft", {"output_dir": "x"}, "m", "o", None, False, None)
    argv = stage_argv("smat", {"recall_distances": [0, 1], "dialogs": False, "unfreeze_schedule": {"decoder": 5}},
                      "prev", str(tmp_path / "smat"), 3, True, "me/rxt")
    assert argv == ["--model_name_or_path", "prev", "--output_dir", str(tmp_path / "smat"), "--recall_distances", "0",
                    "1", "--dialogs", "false", "--unfreeze_schedule", '{"decoder": 5}', "--seed", "3",
                    "--push_to_hub", "true", "--hub_model_id", "me/rxt-smat"]
    with pytest.raises(ValueError, match="torch_threads"):
        parse_pipeline(["--torch_threads", "0"])
    args, stages, specs, root, seed = parse_pipeline(["--preset", "tiny", "--stages", "sft,pretrain"])
    assert stages == ["pretrain", "sft"] and seed == 0 and str(root) == "outputs/rxt_pipeline_tiny"
    assert args.torch_threads == 1  # the preset's; the flag wins over it
    assert parse_pipeline(["--preset", "tiny", "--torch_threads", "2"])[0].torch_threads == 2
    assert specs["smat"]["config"].endswith("rxt_smat_tiny.yaml")
