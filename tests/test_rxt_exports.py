"""What the Reactive Transformer curriculum exports: the training model classes from `rat_hf`, the stage trainers and
configs from `rat_hf.trainers` (loaded on first use), the MRL rewards by name in the reward registry, and
`mrl_recall_dataset` from `rat_hf.data.interactions`; `import rat_hf` stays free of trl, datasets and the trainers."""

import json
import subprocess
import sys

import pytest
import torch

import rat_hf
import rat_hf.trainers as trainers
from rat_hf.rewards import MRL_REWARD_FUNCS, REWARD_FUNCS, get_reward_funcs


def test_rat_hf_exports_the_training_model_classes():
    from rat_hf.models.rxt import RxTForMaskedLM, RxTForPreTraining

    assert rat_hf.RxTForMaskedLM is RxTForMaskedLM and rat_hf.RxTForPreTraining is RxTForPreTraining
    assert {"RxTForMaskedLM", "RxTForPreTraining"} <= set(rat_hf.__all__)


@pytest.mark.parametrize("name", trainers._RXT)
def test_every_rxt_trainer_export_resolves_to_its_module_object(name):
    import importlib

    module = importlib.import_module(f"rat_hf.trainers.{trainers._RXT[name]}")
    assert getattr(trainers, name) is getattr(module, name)
    assert name in trainers.__all__


def test_unknown_names_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="RxTNope"):
        trainers.RxTNope  # noqa: B018


def loaded_after(statement: str, prefixes: tuple) -> list:
    code = (f"import sys; {statement}; import json; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_importing_the_packages_loads_no_rxt_trainer_mrl_reward_or_optional_dependency():
    assert loaded_after("import rat_hf, rat_hf.rewards", ("trl", "datasets", "rat_hf.rewards.mrl")) == []
    # (transformers' Trainer itself imports `datasets` when it is installed, so rat_hf.trainers is checked for ours)
    assert loaded_after("import rat_hf.trainers", ("rat_hf.trainers.rxt_", "rat_hf.rewards.mrl", "trl")) == []


def test_mrl_rewards_are_registered_by_name():
    from rat_hf.rewards import mrl

    funcs = get_reward_funcs("bleu_to_reference,bleu_to_saved,length_ratio,exact_match")
    assert funcs == [mrl.bleu_to_reference, mrl.bleu_to_saved, mrl.length_ratio_reward, mrl.exact_match_reward]
    assert get_reward_funcs(["exact_match_reward"]) == [mrl.exact_match_reward]  # the `_reward` suffix, as for chat
    assert rat_hf.rewards.bleu_to_saved is mrl.bleu_to_saved  # also as attributes, imported on first use
    assert not set(MRL_REWARD_FUNCS) & set(REWARD_FUNCS)  # no MRL name shadows a chat reward
    # TRL's call: lists of ids per completion, the targets as dataset columns
    scores = [f(prompts=["p", "p"], completions=["a", "b"], completion_ids=[[5, 6, 7, 8], [1, 2, 3]],
                reference_ids=[[5, 6, 7, 8], [5, 6, 7]], saved_ids=[[9, 9], [1, 2, 3]]) for f in funcs]
    assert scores[0][0] == pytest.approx(1.0) and scores[0][1] < 0.5  # BLEU to the reference
    assert scores[1][1] > 0.5 > scores[1][0]  # BLEU to the saved interaction
    assert scores[2] == pytest.approx([1.0, 1.0]) and scores[3] == [1.0, 0.0]  # length ratio, exact match


def test_the_embedding_rewards_ask_for_an_embedding_by_name():
    with pytest.raises(ValueError, match="EmbeddingCosineReward"):
        get_reward_funcs(["cosine_to_reference"])
    with pytest.raises(ValueError, match="bleu_to_reference"):  # the known names are listed
        get_reward_funcs(["no_such_reward"])


def test_mrl_recall_dataset_lives_with_the_interaction_data():
    pytest.importorskip("datasets")
    from rat_hf.data.interactions import MRL_STRATEGIES, mrl_recall_dataset
    from rat_hf.trainers import rxt_mrl_config, rxt_mrl_trainer

    assert rxt_mrl_trainer.mrl_recall_dataset is mrl_recall_dataset
    assert rxt_mrl_config.STRATEGIES == MRL_STRATEGIES
    row = mrl_recall_dataset(2, 4, "cumulative", seed=1)[0]
    facts = [row["query"]] + [t["query"] for t in row["interactions"]]
    for k, turn in enumerate(row["interactions"]):  # turn k+1 asks for the value stated at turn k
        assert facts[k].endswith(f" is {turn['answer']}.")
    with pytest.raises(ValueError, match="strategy"):
        mrl_recall_dataset(2, 4, "sideways")


def test_recall_accuracy_is_the_smat_trainers():
    from rat_hf.trainers.rxt_smat_trainer import recall_accuracy

    assert trainers.recall_accuracy is recall_accuracy
    assert torch.is_grad_enabled()
