"""Stage C LoRA training (wuerstchen.train): the official recipe's loss, the loop, resume, the file."""

import math

import pytest
import torch
from train_helpers import picture_tensor, tiny_effnet, tiny_stage_c, tiny_text_encoder, write_pictures

from wuerstchen.train import (DatasetError, LoraTrainer, TrainConfig, encode_examples, from_tensors,
                              read_folder, save_lora, trained_lora)
from wuerstchen.train.dataset import bucket_sizes, closest_bucket

S = 0.008  # the cosine schedule's offset


def _log_snr(t):
    """gdf CosineSchedule(clamp_range=[1e-4, 0.9999]), written out here."""
    min_var = math.cos(S / (1 + S) * math.pi / 2) ** 2
    var = (torch.cos((S + t) / (1 + S) * math.pi / 2).clamp(0, 1) ** 2 / min_var).clamp(1e-4, 0.9999)
    return torch.log(var / (1 - var))


def _noise_cond(log_snr):
    """gdf CosineTNoiseCond: the schedule inverted."""
    min_var = math.cos(S / (1 + S) * math.pi / 2) ** 2
    return (torch.acos((torch.sigmoid(log_snr) * min_var).sqrt()) / (math.pi / 2) * (1 + S) - S).clamp(0, 1)


@pytest.fixture(scope="module")
def models():
    return tiny_stage_c(), tiny_text_encoder(), tiny_effnet()


@pytest.fixture(scope="module")
def data(models):
    examples = from_tensors([picture_tensor(i) for i in range(4)], [f"a [dog] picture {i}" for i in range(4)])
    return encode_examples(models[2], examples, resolution=128)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_one_step_loss_matches_the_gdf_formulas(models, data):
    stage_c, text, _ = models
    cfg = TrainConfig(steps=1, batch=3, accum=2, resolution=128, text_dropout=0.5, seed=3)
    trainer = LoraTrainer(stage_c, text, data, cfg)
    g = torch.Generator()
    g.set_state(trainer.generator.get_state())
    with trainer.session():
        per_example, loss = trainer.micro_loss()
    # The same draws, in the documented order: first picture, the rest of its bucket, dropout, t, noise.
    first = int(torch.randint(len(data), (1,), generator=g))
    bucket = data.buckets[tuple(data.latents[first].shape[-2:])]
    idx = [first] + [bucket[int(j)] for j in torch.randint(len(bucket), (2,), generator=g)]
    dropped = (torch.rand(3, generator=g) < 0.5).tolist()
    t = ((1 - torch.rand(3, generator=g)) + 0.001).clamp(0.001, 1)
    x0 = torch.stack([data.latents[i] for i in idx])
    eps = torch.randn(x0.shape, generator=g)
    lam = _log_snr(t)
    a, b = torch.sigmoid(lam).sqrt(), (1 - torch.sigmoid(lam)).sqrt()
    noised = a.view(-1, 1, 1, 1) * x0 + b.view(-1, 1, 1, 1) * eps
    captions = ["" if d else data.captions[i] for i, d in zip(idx, dropped)]
    ids, mask = text.tokenize(captions)
    with torch.no_grad():
        enc = text(ids, mask)
        pred = stage_c(noised, _noise_cond(lam), clip_text=enc.clip_text, clip_text_pooled=enc.clip_text_pooled,
                       clip_img=torch.zeros(3, 1, stage_c.clip_img_mapper.in_features))
    mse = ((pred - eps) ** 2).mean(dim=(1, 2, 3))
    weight = 1 / (1 + torch.exp(lam))  # P2 with k = gamma = 1
    assert torch.allclose(per_example, mse, rtol=1e-5, atol=1e-6)
    assert torch.allclose(loss, (mse * weight).mean() / 2, rtol=1e-5, atol=1e-7)
    assert any(dropped) and not all(dropped)  # both branches of the text dropout are covered


def test_session_leaves_the_models_as_they_were(models, data):
    stage_c, text, _ = models
    before_c, before_t = _snapshot(stage_c), _snapshot(text)
    params = {n: p for n, p in stage_c.named_parameters()}
    flags = {n: p.requires_grad for n, p in params.items()}
    trainer = LoraTrainer(stage_c, text, data, TrainConfig(steps=3, resolution=128, lr=1e-2,
                                                             tokens=("[dog]:^dog</w>",)))

    def stop(step, total, record):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.run(on_step=stop)
    assert trainer.step == 2
    assert {n: p for n, p in stage_c.named_parameters()} == params  # the same Parameter objects
    assert {n: p.requires_grad for n, p in stage_c.named_parameters()} == flags
    for k, v in _snapshot(stage_c).items():
        assert torch.equal(v, before_c[k]), k
    for k, v in _snapshot(text).items():
        assert torch.equal(v, before_t[k]), k
    assert "forward" not in stage_c.down_blocks[0][0].__dict__
    assert not text.tokenizer.added_tokens


def test_resume_is_bit_identical(models, data, tmp_path):
    stage_c, text, _ = models
    cfg = dict(steps=10, batch=2, accum=2, resolution=128, lr=1e-3, warmup=3, seed=5, tokens=("[dog]:^dog</w>",))
    straight = LoraTrainer(stage_c, text, data, TrainConfig(**cfg))
    straight.run()
    ckpt = tmp_path / "train.ckpt"
    first = LoraTrainer(stage_c, text, data, TrainConfig(**cfg))
    first.run(until=5, checkpoint=ckpt)
    resumed = LoraTrainer(stage_c, text, data, TrainConfig(**cfg))
    resumed.load_checkpoint(ckpt)
    assert resumed.step == 5
    resumed.run()
    a, b = trained_lora(straight), trained_lora(resumed)
    for x, y in zip(a.stage_c_indexed, b.stage_c_indexed):
        assert torch.equal(x.up, y.up) and torch.equal(x.down, y.down)
    assert torch.equal(a.embeddings[0].vectors, b.embeddings[0].vectors)
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]
    with pytest.raises(ValueError, match="other settings"):
        LoraTrainer(stage_c, text, data, TrainConfig(**{**cfg, "rank": 2})).load_checkpoint(ckpt)


def test_checkpointing_gives_the_same_gradients(models, data):
    stage_c, text, _ = models
    runs = []
    for ckpt in (False, True):
        trainer = LoraTrainer(stage_c, text, data, TrainConfig(steps=2, resolution=128, lr=1e-2, seed=1,
                                                                 gradient_checkpointing=ckpt))
        trainer.run()
        runs.append(trained_lora(trainer))
    for x, y in zip(runs[0].stage_c_indexed, runs[1].stage_c_indexed):
        assert torch.allclose(x.down, y.down, atol=1e-6)


def test_saved_file_loads_with_the_trained_weights(models, data, tmp_path):
    from wuerstchen.lora import load_lora
    from wuerstchen.pipeline.stages import LoraUse, stage_c_loras, text_loras

    stage_c, text, _ = models
    trainer = LoraTrainer(stage_c, text, data, TrainConfig(steps=3, resolution=128, lr=1e-2,
                                                             tokens=("[dog]:^dog</w>",)))
    trainer.run()
    path, meta = save_lora(trainer, tmp_path / "my_lora.safetensors", base_model="tiny stage_c")
    lora = load_lora(path)
    assert lora.format == "official" and lora.metadata["rank"] == "4" and lora.metadata["steps"] == "3"
    assert [e.word for e in lora.embeddings] == ["[dog]"]
    # The loader's weights = the weights the trainer computed with (read through the parametrization).
    with trainer.session():
        live = {t: getattr(stage_c.get_submodule(t.rpartition(".")[0]), t.rpartition(".")[2]).detach().clone()
                for t in trainer.lora.targets}
        expected_word = trainer.tokens.rows()[0].detach().clone()
    with stage_c_loras(stage_c, [LoraUse(lora)]):
        patched = dict(stage_c.named_parameters())
        for t, w in live.items():
            assert torch.allclose(patched[t], w, atol=1e-6), t
    with text_loras(text, [LoraUse(lora)]):
        assert torch.allclose(text.added_token_vectors()["[dog]"], expected_word, atol=1e-6)
    # The in-memory LoRA equals the file.
    memory = trained_lora(trainer)
    for x, y in zip(memory.stage_c_indexed, lora.stage_c_indexed):
        assert torch.equal(x.up, y.up) and torch.equal(x.down, y.down)


def test_buckets_are_the_official_ones():
    sizes = bucket_sizes(768)
    assert sizes[0] == (768, 768) and len(sizes) == 23  # 12 ratios and 11 new reciprocals
    assert (1056, 512) in sizes and (512, 1056) in sizes  # 1/2 -> h = floor(sqrt(768²·2)/32)·32
    assert closest_bucket(1080, 1920, 768) == (576, 1024)  # 16:9 -> the 9/16 ratio's reciprocal
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in sizes)


def test_bad_datasets_are_refused_before_training(tmp_path, models):
    from PIL import Image

    effnet = models[2]
    with pytest.raises(DatasetError, match="no such folder"):
        read_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no pictures"):
        read_folder(tmp_path / "empty")
    folder = write_pictures(tmp_path / "nocap", n=2)
    (folder / "pic1.txt").unlink()
    with pytest.raises(DatasetError, match="pic1.png needs pic1.txt"):
        read_folder(folder)
    folder = write_pictures(tmp_path / "broken", n=2)
    (folder / "pic0.png").write_bytes(b"not a picture")
    with pytest.raises(Exception, match="pic0.png.*cannot read"):
        read_folder(folder)
    folder = write_pictures(tmp_path / "small", n=1, size=(40, 40))
    with pytest.raises(DatasetError, match="too small"):
        encode_examples(effnet, read_folder(folder), resolution=128)
    with pytest.raises(DatasetError, match="3 pictures but 2 captions"):
        from_tensors(torch.rand(3, 64, 64, 3), ["a", "b"])


def test_an_interrupt_keeps_the_last_checkpoint(models, data, tmp_path):
    stage_c, text, _ = models
    ckpt = tmp_path / "run.ckpt"
    trainer = LoraTrainer(stage_c, text, data, TrainConfig(steps=6, resolution=128, seed=2))

    def stop(step, total, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.run(on_step=stop, checkpoint=ckpt, save_every=2)
    again = LoraTrainer(stage_c, text, data, TrainConfig(steps=6, resolution=128, seed=2))
    again.load_checkpoint(ckpt)
    assert again.step == 2 and len(again.history) == 2
    assert not (tmp_path / "run.ckpt.tmp").exists()


def test_bf16_autocast_trains_with_float32_master_weights(models, data):
    stage_c, text, _ = models
    trainer = LoraTrainer(stage_c, text, data, TrainConfig(steps=2, resolution=128, lr=1e-2, precision="bf16"))
    trainer.run()
    assert all(math.isfinite(r["loss"]) for r in trainer.history)
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert any(bool(f.lora_down.abs().sum() > 0) for f in trainer.lora.weights)


def test_learned_tokens_start_as_the_official_trainer_starts_them(models):
    from wuerstchen.text.tokenizer import CLIPTokenizer
    from wuerstchen.train import LearnedTokens, TokenSpec

    text = models[1]
    vocab = CLIPTokenizer().vocabulary.token_ids
    weight = text.token_embedding.weight.detach()
    tokens = LearnedTokens([TokenSpec.parse("[pet]:^dog"), TokenSpec.parse("^snail")], weight)
    dog_rows = [i for t, i in vocab.items() if t.startswith("dog")]
    snail_rows = sorted(i for t, i in vocab.items() if t.startswith("snail"))
    assert len(dog_rows) > 1 and len(snail_rows) > 1
    assert tokens.indices[0] == 49408 and sorted(tokens.indices[1:]) == snail_rows
    assert torch.allclose(tokens.start[0], weight[dog_rows].mean(0))
    assert torch.equal(tokens.start[1:], weight[tokens.indices[1:]])
    assert torch.count_nonzero(tokens.embeddings) == 0  # the learned change starts at zero (ReToken)
    # The new word is one token, encoded with its row; unchanged rows give the plain encoding.
    clip_text, pooled = tokens.encode(text, ["a snail", "a photo of [pet]"])
    ids, mask = text.tokenize(["a snail"])
    plain = text(ids, mask)
    assert torch.allclose(clip_text[0], plain.clip_text[0], atol=1e-5)
    assert tokens.tokenizer.encode("[pet]") == [49408]


def test_pictures_of_other_shapes_train_in_their_own_buckets(models):
    stage_c, text, effnet = models
    shapes = [(96, 160), (96, 160), (160, 96), (160, 96)]  # landscape and portrait (h, w)
    examples = from_tensors([picture_tensor(i, s) for i, s in enumerate(shapes)], ["a", "b", "c", "d"])
    data = encode_examples(effnet, examples, resolution=128)
    assert sorted(data.buckets) == [(3, 5), (5, 3)]
    trainer = LoraTrainer(stage_c, text, data, TrainConfig(steps=4, batch=2, resolution=128))
    trainer.run()
    assert len(trainer.history) == 4


def test_kohya_repeat_folders(tmp_path, models):
    root = write_pictures(tmp_path / "set", n=1)
    write_pictures(root / "3_dog", n=2, caption="a [dog] {i}")
    write_pictures(root / "other", n=1, caption="other {i}")
    examples = read_folder(root)
    names = [e.name for e in examples]
    assert names == ["pic0.png"] + ["3_dog/pic0.png", "3_dog/pic1.png"] * 3 + ["other/pic0.png"]
    data = encode_examples(models[2], examples, resolution=128)
    assert data.latents[1] is data.latents[3]  # a repeated picture is encoded once
