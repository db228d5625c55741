"""Run by tests/test_integrations.py under torchrun (2 CPU processes, gloo): ContinualTrainer over
three tasks; every rank writes its own adapters to OUT/rank<r> for the test to compare."""
import os
import sys

import torch
import transformers

import share_kernels as sk
from share_kernels.integrations import ContinualTrainer
from tests.test_integrations import Rows  # the same rows as the single-process tests

transformers.logging.set_verbosity_error()


def main(out: str, method: str) -> None:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(cfg)
    options = {"share": dict(k=4, p=2, r=4, phi=2), "inflora": dict(r=2), "pslora": dict(r=2)}[method]
    learner = sk.ContinualLearner(model, method, ["query", "value"], **options)
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=4, max_steps=3, learning_rate=2e-2,
        report_to=[], logging_strategy="no", save_strategy="no", use_cpu=True, disable_tqdm=True, ddp_backend="gloo",
    )
    trainer = ContinualTrainer(args=args, learner=learner, save_dir=os.path.join(out, "main"))
    trainer.train_tasks([("t0", Rows(16, 0)), ("t1", Rows(16, 1)), ("t2", Rows(16, 2))])
    rank = int(os.environ.get("RANK", "0"))
    sk.save_adapters(model, os.path.join(out, f"rank{rank}"))
    print(f"rank {rank} of {trainer.args.world_size}: done")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
