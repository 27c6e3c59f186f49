"""Issue 27: your model, your data. Tiny random Qwen2 / Mistral / Qwen3 / Gemma / LLaMA folders
saved with save_pretrained (with a tokenizer) and used through `model.path`; a books log with
string ids, dates and its own column names used through `data.source: files` and `data.prompt`.
The whole path (train, serve over HTTP, forget, verify bit for bit) runs for Qwen2 and Mistral."""

import dataclasses
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from components import architectures
from components.config import Config, ConfigError, ModelConfig, load_config
from components.data import build_samples, load_interactions_and_items, read_parquet
from components.model import answer_token_ids, head_logits, load_base_model, load_tokenizer, p_yes, positions, tokenize, trunk_pass
from components.registry import Registry
from components.store import Workdir, load_splits
from ray_jobs import forget as forget_job
from ray_jobs import train as train_job

from .conftest import ROOT, free_port
from .test_forget import assert_identical_to_scratch
from .test_registry import mlflow_server  # noqa: F401 - a real `mlflow server` on 127.0.0.1

pytestmark = pytest.mark.timeout(900)
TOKEN = "books-forget-token"
# Each family's own twist, kept small: Qwen2's q/k/v biases, Mistral's sliding window (shorter
# than a prompt, so the window is in force), Qwen3's normed queries and keys, Gemma's scaled
# embeddings; grouped-query attention everywhere.
FAMILY_CONFIGS = {
    "llama": (LlamaConfig, {}),
    "mistral": (MistralConfig, {"sliding_window": 48}),
    "qwen2": (Qwen2Config, {}),
    "qwen3": (Qwen3Config, {"head_dim": 16}),
    "gemma": (GemmaConfig, {"head_dim": 16}),
}
BOOKS_PROMPT = ("A reader rated books. Enjoyed: {liked}. Did not enjoy: {disliked}.\n"
                'Will the reader enjoy the book "{target}"? Answer Yes or No.\nAnswer:')
BOOK_COLUMNS = {"User-ID": "user_id", "ISBN": "item_id", "Book-Rating": "rating", "Read-At": "timestamp", "Book-Title": "title"}


def save_tiny_model(folder: Path, family: str, layers: int = 3, seed: int = 0) -> Path:
    """A tiny random model of `family`, as a Hugging Face folder: config.json, safetensors
    weights and a tokenizer (SmolLM2's, in which " Yes" and " No" are single tokens)."""
    tokenizer = load_tokenizer(ModelConfig(name="tiny-llama"))
    config_class, extra = FAMILY_CONFIGS[family]
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_books(folder: Path, users: int = 24, per_user: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """A Book-Crossing-like log: string user ids, ISBNs that look like numbers, ratings 1-10, read dates as text."""
    rng = np.random.default_rng(seed)
    words = ["Silent", "River", "Glass", "Garden", "Winter", "Atlas", "Harbor", "Ember", "Paper", "Moon", "Salt", "Orchard"]
    books = pd.DataFrame({"ISBN": [f"0{140449000 + i}" for i in range(60)],  # ISBN-10s with a leading 0
                          "Book-Title": [f"The {words[i % 12]} {words[(i * 5 + 3) % 12]} ({1950 + i})" for i in range(60)]})
    rows = []
    for user in range(users):
        for isbn in rng.choice(books["ISBN"], size=per_user, replace=False):
            day = pd.Timestamp("2024-01-01") + pd.Timedelta(days=int(rng.integers(0, 365)), minutes=int(rng.integers(0, 1440)))
            rows.append({"User-ID": f"u-{user:02d}{'abcdefgh'[user % 8]}", "ISBN": isbn,
                         "Book-Rating": int(rng.integers(1, 11)), "Read-At": day.isoformat()})
    inter, items = folder / "ratings.csv", folder / "books.csv"
    pd.DataFrame(rows).to_csv(inter, index=False)
    books.to_csv(items, index=False)
    return inter, items


def books_config(folder: Path, model_path: Path, inter: Path, items: Path, experiment: str = "books", **data) -> Path:
    raw = {
        "experiment": experiment, "seed": 3,
        "data": {"source": "files", "interactions_path": str(inter), "items_path": str(items), "columns": BOOK_COLUMNS,
                 "like_threshold": 6, "prompt": BOOKS_PROMPT, "history_len": 5, "n_train": 96, "n_valid": 16, "n_test": 16,
                 **data},
        "model": {"path": str(model_path), "max_length": 256, "trunk_layers": 1},
        "partition": {"method": "semantic", "num_shards": 2, "num_slices": 2, "reference_size": 32},
        "train": {"epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "cpus_per_actor": 0.5},
        "aggregate": {"neighbours": 4},
        "serving": {"forget_token": TOKEN},
    }
    path = folder / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("your-model")
    return {family: save_tiny_model(root / family, family) for family in FAMILY_CONFIGS}


@pytest.fixture(scope="module")
def books(tmp_path_factory):
    return write_books(tmp_path_factory.mktemp("books"))


# --- the model: every family is cut into trunk and head --------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_trunk_then_head_is_each_familys_own_forward(folders, family):
    """Through model.path, the trunk and head compute what transformers computes whole, with
    positions from the mask, for a left-padded batch (Mistral's window shorter than the prompts)."""
    config = ModelConfig(path=str(folders[family]), trunk_layers=1, trunk_dtype="float32", max_length=512)
    tokenizer = load_tokenizer(config)
    base = load_base_model(config, 0, tokenizer)
    assert base.config.model_type == family
    prompts = [BOOKS_PROMPT.format(liked='"The Moon Atlas (1960)"', disliked="", target="Salt (1999)"),
               BOOKS_PROMPT.format(liked=", ".join(['"The Silent Garden (1971)"'] * 6), disliked='"Ember (1950)"', target="Paper")]
    batch = tokenize(tokenizer, prompts, 512)
    assert (batch["attention_mask"] == 0).any() and batch["input_ids"].shape[1] > 48
    with torch.no_grad():
        whole = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=positions(batch["attention_mask"]), logits_to_keep=1).logits[:, -1]
        trunk = trunk_pass(base, batch, config)
        split = head_logits(base, trunk.states, trunk.mask, config)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(f for f, v in architectures.FAMILIES.items() if v.answer_position))
def test_the_answer_position_layer_gives_the_plain_layers_p_yes(folders, family, monkeypatch):
    config = ModelConfig(path=str(folders[family]), trunk_layers=1, max_length=512)
    tokenizer = load_tokenizer(config)
    base = load_base_model(config, 0, tokenizer)
    yes, no = answer_token_ids(tokenizer, config)
    prompts = [BOOKS_PROMPT.format(liked='"Salt (1999)"', disliked='"Paper (1951)", "Moon (1952)"', target="Ember"),
               BOOKS_PROMPT.format(liked="", disliked="", target="The Glass Harbor (2001)")]
    trunk = trunk_pass(base, tokenize(tokenizer, prompts, 512), config)
    with torch.no_grad():
        fast = p_yes(head_logits(base, trunk.states, trunk.mask, config), yes, no)
        monkeypatch.setitem(architectures.FAMILIES, family, dataclasses.replace(architectures.FAMILIES[family], answer_position=False))
        plain = p_yes(head_logits(base, trunk.states, trunk.mask, config), yes, no)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_base_weights_load_in_the_configured_dtype_and_score_close_to_float32(folders, dtype):
    exact = ModelConfig(path=str(folders["qwen2"]), trunk_layers=1, max_length=512)
    rounded = exact.model_copy(update={"dtype": dtype})
    tokenizer = load_tokenizer(exact)
    prompts = [BOOKS_PROMPT.format(liked='"Salt (1999)"', disliked="", target="Ember")]
    scores = {}
    for config in (exact, rounded):
        base = load_base_model(config, 0, tokenizer)
        assert next(base.parameters()).dtype == getattr(torch, config.dtype)
        trunk = trunk_pass(base, tokenize(tokenizer, prompts, 512), config)
        scores[config.dtype] = p_yes(head_logits(base, trunk.states, trunk.mask, config), *answer_token_ids(tokenizer, config))
    torch.testing.assert_close(scores[dtype], scores["float32"], rtol=0, atol=0.02)


def test_a_model_folder_the_platform_cannot_split_is_a_config_error_naming_it(folders, tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    for model, message in (({"path": str(tmp_path / "gpt2")}, r"architecture 'gpt2' is not supported"),
                           ({"path": str(tmp_path / "nowhere")}, r"nowhere: no config.json"),
                           ({"path": str(folders["qwen2"]), "name": "tiny-llama"}, "not both")):
        path = tmp_path / "model.yaml"
        path.write_text(yaml.safe_dump({"experiment": "x", "model": model}))
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    path.write_text(yaml.safe_dump({"experiment": "x", "model": {"path": str(folders["mistral"])}}))
    assert load_config(path).model.label == str(folders["mistral"])


def test_answer_words_that_are_not_one_token_are_refused_by_name(folders):
    config = ModelConfig(path=str(folders["qwen2"]), answer_tokens=(" Yes please", " No"))
    with pytest.raises(ValueError, match="Yes please"):
        answer_token_ids(load_tokenizer(config), config)
    lower = config.model_copy(update={"answer_tokens": (" yes", " no")})
    assert answer_token_ids(load_tokenizer(lower), lower) != answer_token_ids(load_tokenizer(lower), ModelConfig())


def test_lora_targets_default_per_family_and_the_config_overrides(folders):
    from peft import get_peft_model

    from components.train import lora_config

    for family in ("qwen2", "gemma"):
        config = Config(experiment="x", model={"path": str(folders[family]), "trunk_layers": 1})
        base = load_base_model(config.model, 0, load_tokenizer(config.model))
        adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in get_peft_model(base, lora_config(config, base)).named_parameters()
                   if "lora_A" in n}
        assert adapted == set(architectures.FAMILIES[family].lora_targets)
    config = config.model_copy(update={"adapter": config.adapter.model_copy(update={"target_modules": ("k_proj", "o_proj")})})
    base = load_base_model(config.model, 0, load_tokenizer(config.model))
    names = [n for n, _ in get_peft_model(base, lora_config(config, base)).named_parameters() if "lora_A" in n]
    assert names and all(".k_proj." in n or ".o_proj." in n for n in names)


# --- the data: a books log through data.columns and data.prompt -----------------------------------------


def test_a_books_log_with_string_ids_and_dates_builds_samples_in_its_own_prompt(folders, books, tmp_path):
    config = load_config(books_config(tmp_path, folders["qwen2"], *books))
    inter, items = load_interactions_and_items(config.data)
    assert inter["user_id"].str.startswith("u-").all() and items["item_id"].str.fullmatch(r"0\d{9}").all()
    assert inter["timestamp"].between(1704067200, 1735689600).all()  # 2024, in seconds
    samples = build_samples(inter, items, config.data)
    first = samples.iloc[0]
    assert first["prompt"].startswith("A reader rated books. Enjoyed: ") and first["prompt"].endswith("Answer:")
    assert first["sample_id"] == f"{first['user_id']}:{first['item_id']}" and len(first["interactions"]) == 6
    raw = pd.read_csv(books[0], dtype={"ISBN": str})
    rating = raw.set_index(["User-ID", "ISBN"])["Book-Rating"]
    assert samples["label"].tolist() == [int(rating[(u, i)] > 6) for u, i in zip(samples["user_id"], samples["item_id"])]


def test_an_explicit_label_column_replaces_the_rating_rule(folders, books, tmp_path):
    raw = pd.read_csv(books[0], dtype={"ISBN": str})
    raw["Liked"] = (raw["Book-Rating"] >= 9).astype(int)
    labelled = tmp_path / "labelled.csv"
    raw.drop(columns=["Book-Rating"]).to_csv(labelled, index=False)
    path = books_config(tmp_path, folders["qwen2"], labelled, books[1], label_column="Liked",
                        columns={k: v for k, v in BOOK_COLUMNS.items() if v != "rating"})
    raw_config = yaml.safe_load(path.read_text())
    del raw_config["data"]["like_threshold"]
    path.write_text(yaml.safe_dump(raw_config))
    config = load_config(path)
    samples = build_samples(*load_interactions_and_items(config.data), config.data)
    liked = raw.set_index(["User-ID", "ISBN"])["Liked"]
    assert samples["label"].tolist() == [liked[(u, i)] for u, i in zip(samples["user_id"], samples["item_id"])]
    assert Config.model_validate(config.model_dump(mode="json")) == config  # as shard actors receive it


@pytest.mark.parametrize("prompt, message", [
    ("Liked {liked}; disliked {disliked}; {target}? {mood}", r"unknown: \{mood\}"),
    ("Liked {liked}; will they like {target}?", r"missing: \{disliked\}"),
    ("Liked {liked", "not a template"),
])
def test_a_prompt_template_with_an_unknown_or_missing_placeholder_is_a_config_error(folders, books, tmp_path, prompt, message):
    with pytest.raises(ConfigError, match=message):
        load_config(books_config(tmp_path, folders["qwen2"], *books, prompt=prompt))


def _broken(tmp_path, books, what):
    """A copy of the books log with one defect; returns (interactions, items, the words the error must name)."""
    inter, items = pd.read_csv(books[0], dtype={"ISBN": str}), pd.read_csv(books[1], dtype={"ISBN": str})
    if what == "missing file":
        return tmp_path / "absent.csv", books[1], ["absent.csv", "not found"]
    if what == "missing column":
        inter = inter.drop(columns=["Read-At"])
        words = ["ratings.csv", "'Read-At'"]
    elif what == "duplicate item ids":
        items.loc[3, "ISBN"] = items.loc[2, "ISBN"]
        words = ["books.csv", "'ISBN'", "2 rows"]
    elif what == "item without a title":
        items.loc[[4, 9], "Book-Title"] = ""
        words = ["books.csv", "'Book-Title'", "2 rows"]
    elif what == "ratings not numbers":
        inter["Book-Rating"] = inter["Book-Rating"].astype(object)
        inter.loc[[1, 5, 7], "Book-Rating"] = "ten"
        words = ["ratings.csv", "'Book-Rating'", "3 rows", "'ten'"]
    elif what == "too few samples":
        inter = inter[inter["User-ID"].isin(inter["User-ID"].unique()[:6])]
        words = ["ratings.csv", "train period", "data.n_train = 96"]
    folder = tmp_path / what.replace(" ", "-")
    folder.mkdir()
    inter.to_csv(folder / "ratings.csv", index=False)
    items.to_csv(folder / "books.csv", index=False)
    return folder / "ratings.csv", folder / "books.csv", words


BAD_DATA = ["missing file", "missing column", "duplicate item ids", "item without a title", "ratings not numbers", "too few samples"]


@pytest.mark.parametrize("what", BAD_DATA)
def test_bad_data_stops_every_job_with_exit_2_naming_file_and_column_and_writes_nothing(folders, books, tmp_path, capsys, what):
    from ray_jobs import evaluate as evaluate_job
    from serving import __main__ as serving_cli

    inter, items, words = _broken(tmp_path, books, what)
    config = books_config(tmp_path, folders["qwen2"], inter, items)
    workdir = tmp_path / "work"
    jobs = [train_job.main, forget_job.main, evaluate_job.main, serving_cli.main]
    for job in jobs if what == BAD_DATA[1] else jobs[:1]:  # every job on one defect, train on each
        with pytest.raises(SystemExit) as stopped:
            job(["--config", str(config), "--workdir", str(workdir)])
        assert stopped.value.code == 2, job
        message = capsys.readouterr().err
        assert all(word in message for word in words), message
        assert not workdir.exists()


# --- the whole path: train, serve over HTTP, forget, verify bit for bit -------------------------------------


def _wait_for(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while not (result := check()):
        assert time.time() < deadline, what
        time.sleep(0.2)
    return result


@pytest.mark.slow  # make test keeps each family's forward (above); test_forget the exactness of a round
def test_qwen2_on_books_trains_serves_forgets_and_equals_training_from_scratch(ray_session, folders, books, tmp_path):
    from ray import serve

    from components.aggregate import load_served_set
    from serving.app import build_app

    config_path = books_config(tmp_path, folders["qwen2"], *books)
    config = load_config(config_path)
    workdir = Workdir(tmp_path / "work")
    assert train_job.main(["--config", str(config_path), "--workdir", str(workdir.root)]) == 0
    registry = Registry(config.experiment, workdir.root)

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"config": str(config_path), "workdir": str(workdir.root)}), name="books", route_prefix="/")
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        _wait_for(lambda: http.get("/healthz").status_code == 200, 60, "the books recommender did not become healthy")
        # A test sample's request: its history (ISBNs and ratings) gives the prompt it was trained with.
        test = read_parquet(workdir.split("test")).iloc[0]
        ratings = load_interactions_and_items(config.data)[0].set_index("user_id").loc[test["user_id"]].set_index("item_id")["rating"]
        history = [{"item_id": i.split(":")[1], "rating": float(ratings[i.split(":")[1]])} for i in test["interactions"][:-1]]
        body = {"history": history, "candidates": [test["item_id"]]}
        got = http.post("/v1/predict", json=body)
        assert got.status_code == 200, got.text
        served = load_served_set(config, registry.load_adapter_set(tmp_path / "set"))
        expected = served.predict(config, [test["prompt"]]).p_yes
        assert got.json()["predictions"][0]["item_id"] == test["item_id"]
        np.testing.assert_allclose(got.json()["predictions"][0]["p_yes"], expected[0], rtol=0, atol=1e-6)

        user = sorted(read_parquet(workdir.shard_samples(0))["user_id"])[0]
        auth = {"Authorization": f"Bearer {TOKEN}"}
        accepted = http.post("/v1/forget", json={"users": [user], "request_id": "books-1"}, headers=auth)
        assert accepted.status_code == 202, accepted.text
        _wait_for(lambda: http.get("/v1/forget/books-1", headers=auth).json()["state"] == "done", 300, "the forget request never got done")
        # The replica swaps in the clean set on its next poll (503 until then if every shard was affected).
        _wait_for(lambda: (r := http.post("/v1/predict", json=body)).status_code == 200
                  and r.json()["adapter_set_version"] != got.json()["adapter_set_version"], 60, "the clean set is not served")
        # After "done" the id is nowhere: work dir, MLflow, Serve's and the jobs' logs, the Ray job list.
        # A reader still in the data is found (the scan can fail).
        scan = ["--config", str(config_path), "--workdir", str(workdir.root), "--scan-for"]
        assert forget_job.main([*scan, user]) == 0
        assert forget_job.main([*scan, sorted(read_parquet(workdir.shard_samples(1))["user_id"])[-1]]) == 1
    finally:
        from ray_jobs.reconcile import stop_reconciler

        stop_reconciler(workdir.root)
        http.close()
        serve.shutdown()
    assert user not in set(load_splits(workdir)["train"]["user_id"])
    assert_identical_to_scratch(config, workdir, tmp_path, [user], [])


@pytest.mark.slow  # a training and a forget of its own: make test-slow; make test purges on a real server in test_registry
def test_mistral_on_books_forgets_a_user_from_the_command_line_without_a_trace(ray_session, folders, books, tmp_path,
                                                                               capsys, mlflow_server):
    """On a real MLflow server: the id is found nowhere after the forget, its database and
    artifact store and the Kubernetes manifests included. That the same round equals a training
    from scratch bit for bit: tests/test_forget.py (make test) and the Qwen2 test above (make test-slow)."""
    url, artifacts = mlflow_server
    config_path = books_config(tmp_path, folders["mistral"], *books, experiment="books-mistral")
    config = load_config(config_path)
    workdir = Workdir(tmp_path / "work")
    assert train_job.main(["--config", str(config_path), "--workdir", str(workdir.root)]) == 0
    user = sorted(read_parquet(workdir.shard_samples(1))["user_id"])[-1]
    request = tmp_path / "ticket-7.json"  # the id travels in the file, which the job deletes
    request.write_text(json.dumps({"users": [user]}))
    capsys.readouterr()
    assert forget_job.main(["--config", str(config_path), "--workdir", str(workdir.root), "--request-file", str(request)]) == 0
    assert not request.exists() and user not in capsys.readouterr().out
    audit = json.loads(next(workdir.path("audit").glob("*.json")).read_text())
    assert audit["scan"]["clean"] and 1 in audit["affected_shards"]
    assert Registry(config.experiment, workdir.root).tracking_uri == url and any(artifacts.rglob("adapter.pt"))
    places = [f"--scan-path={path}" for path in (tmp_path / "server.db", artifacts, ROOT / "k8s")]
    assert forget_job.main(["--config", str(config_path), "--workdir", str(workdir.root), *places, "--scan-for", user]) == 0
    other = sorted(read_parquet(workdir.shard_samples(0))["user_id"])[0]
    assert forget_job.main(["--config", str(config_path), "--workdir", str(workdir.root), *places, "--scan-for", other]) == 1


@pytest.mark.parametrize("example, family", [("books.yaml", "qwen2"), ("gpu-7b.yaml", "llama")])
def test_the_example_configs_are_valid_once_their_model_folder_exists(folders, example, family):
    """configs/examples/ name folders of this machine's absence: with a tiny folder of the same
    family in its place, every other key of the example is a valid config."""
    config = load_config(ROOT / "configs" / "examples" / example, model={"path": str(folders[family])})
    assert config.model.path == str(folders[family]) and config.model.name is None
