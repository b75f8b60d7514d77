"""HF Trainer with the sonic backend: ``TrainingArguments(torch_compile_backend="sonic")`` goes
through accelerate's fixed list of backend names and is refused, so the working form is to compile
the model before handing it to the Trainer: ``model.compile(backend="sonic")``. A tiny Mixtral
trains 3 steps that way: every MoE block rewritten, losses finite, parameters updated."""
import pytest
import torch
from torch._dynamo.utils import counters

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
import hf_models  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class _Batches(torch.utils.data.Dataset):
    def __init__(self, n, seq, vocab, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_with_model_compiled_by_sonic(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, ids = hf_models.build("mixtral")
    blocks = hf_models.moe_modules(model)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.compile(backend="sonic")  # instead of TrainingArguments(torch_compile_backend="sonic")
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, seed=0,
    )
    vocab = model.config.vocab_size
    trainer = Trainer(model=model, args=args, train_dataset=_Batches(6, ids.shape[-1], vocab))
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 3 and len(losses) == 3
    assert all(torch.isfinite(torch.tensor(losses))) and torch.isfinite(torch.tensor(result.training_loss))
    # the compiled forward ran (every MoE block rewritten, once: same shapes every step)
    assert counters["sonic"]["moe_rewrites"] == len(blocks) and counters["sonic"]["moe_declined"] == 0
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any(".experts." in n for n in changed) and any("embed" in n for n in changed)


def test_trainer_torch_compile_backend_name_is_refused(tmp_path):
    # why the README says model.compile(backend="sonic"): accelerate checks the name against its
    # own enum of Dynamo backends when the Trainer builds its Accelerator (accelerate 1.12)
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), torch_compile_backend="sonic", use_cpu=True, report_to=[],
                             max_steps=1)
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        Trainer(model=torch.nn.Linear(2, 2), args=args, train_dataset=_Batches(2, 4, 10))
