"""embtier.torch against a real daemon: RemoteEmbeddingBagCollection pools what TorchRec's
EmbeddingBagCollection (when TorchRec imports) and torch.nn.functional.embedding_bag pool on the same
weights, from TorchRec's KeyedJaggedTensor and from embtier.torch.compat's; loading and reading the
tables back (load_state_dict, from_module, state_dict, embtier import-torch); the errors that name
what is wrong; inference mode, a DataLoader loop and several threads."""

from __future__ import annotations

import threading
import urllib.request

import numpy as np
import pytest
import torch
from embtier import Client, EmbtierClientError
from embtier.torch import RemoteEmbeddingBagCollection, compat, tables
from embtier.torch.sparse import TORCHREC

from tests.support import run_cli, running_daemon

if TORCHREC:
    import torchrec

BATCH = 64
SHAPES = {"shared": (1000, 8), "single": (500, 4), "other": (300, 16)}   # table -> (rows, dim)
FEATURES = {"shared": ["a", "b"], "single": ["c"], "other": ["c", "d"]}   # c is read by two tables


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("torch"), "[tiering]\nenabled = false\n") as d:
        yield d


@pytest.fixture(scope="module")
def client(daemon):
    with Client(daemon.target) as c:
        yield c


def configs(module, poolings: dict[str, str], data_type: str = "FP32") -> list:
    """The three tables as module's EmbeddingBagConfig (TorchRec or compat)."""
    return [module.EmbeddingBagConfig(num_embeddings=rows, embedding_dim=dim, name=name,
                                      feature_names=list(FEATURES[name]), pooling=module.PoolingType[poolings[name]],
                                      data_type=module.DataType[data_type])
            for name, (rows, dim) in SHAPES.items()]


def trained_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"embedding_bags.{name}.weight": torch.randn(rows, dim, generator=g) * 0.1
            for name, (rows, dim) in SHAPES.items()}


def an_input(rng: np.random.Generator, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, lengths, weights) of BATCH bags per key, ids of the table with fewest rows; a quarter of
    the bags empty, and every bag of the first key."""
    lengths = rng.integers(1, 7, (len(keys), BATCH))
    lengths[rng.random(lengths.shape) < 0.25] = 0
    lengths[0] = 0
    n = int(lengths.sum())
    values = rng.integers(0, min(rows for rows, _ in SHAPES.values()), n)
    return (torch.from_numpy(values), torch.from_numpy(lengths.reshape(-1)),
            torch.from_numpy(rng.uniform(0.1, 2.0, n).astype(np.float32)))


def reference(weights: dict[str, torch.Tensor], poolings: dict[str, str], keys: list[str], values, lengths,
              per_id: torch.Tensor | None) -> torch.Tensor:
    """torch.nn.functional.embedding_bag per (table, feature), side by side; a weighted MEAN is the
    weighted sum / the bag's length (what fbgemm computes; torch's embedding_bag refuses weights with
    MEAN)."""
    lengths = lengths.view(len(keys), BATCH)
    starts = np.concatenate(([0], np.cumsum(lengths.sum(dim=1).numpy())))
    out = []
    for name in SHAPES:
        for feature in FEATURES[name]:
            k = keys.index(feature)
            ids = slice(int(starts[k]), int(starts[k + 1]))
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths[k].cumsum(0)])
            w = None if per_id is None else per_id[ids]
            mode = "sum" if w is not None else poolings[name].lower()
            pooled = torch.nn.functional.embedding_bag(values[ids], weights[f"embedding_bags.{name}.weight"],
                                                       offsets, mode=mode, per_sample_weights=w,
                                                       include_last_offset=True)
            if w is not None and poolings[name] == "MEAN":
                pooled = pooled / lengths[k].clamp(min=1)[:, None]
            out.append(pooled)
    return torch.cat(out, dim=1)


def kinds() -> list:
    """The modules whose KeyedJaggedTensor and EmbeddingBagCollection go together: compat, and
    TorchRec when it imports."""
    return [compat, *([torchrec] if TORCHREC else [])]


POOLINGS = {"sum": dict.fromkeys(SHAPES, "SUM"), "mean": dict.fromkeys(SHAPES, "MEAN"),
            "mixed": {"shared": "SUM", "single": "MEAN", "other": "MEAN"}}


@pytest.mark.parametrize("wire", ["float32", "float16"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("pooling", list(POOLINGS))
def test_pools_what_embedding_bag_and_torchrec_pool(client, pooling, weighted, wire):
    """Every pooling, with and without weights, both wires: the remote collection's KeyedTensor equals
    embedding_bag's on the same weights, and the in-process EmbeddingBagCollection's (TorchRec's from
    TorchRec's KeyedJaggedTensor, compat's from compat's; both refuse weighted MEAN), with the input's
    keys in any order."""
    poolings = POOLINGS[pooling]
    prefix = f"eq_{pooling}_{weighted}_{wire}_"
    weights = trained_weights()
    keys = ["d", "a", "c", "b"]
    values, lengths, per_id = an_input(np.random.default_rng(len(prefix)), keys)
    want = reference(weights, poolings, keys, values, lengths, per_id if weighted else None)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if wire == "float32" else {"rtol": 2e-3, "atol": 2e-3}
    names = ["a", "b", "c@single", "c@other", "d"]
    for kind in kinds():
        remote = RemoteEmbeddingBagCollection(configs(kind, poolings), client, is_weighted=weighted,
                                              wire_dtype=wire, table_prefix=prefix)
        remote.load_state_dict(weights)
        kjt = kind.KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths, weights=per_id)
        with torch.inference_mode():
            got = remote(kjt)
        assert got.keys() == names
        assert got.length_per_key() == [8, 8, 4, 16, 16]
        torch.testing.assert_close(got.values(), want, **tolerance)
        assert torch.equal(got["d"], torch.zeros(BATCH, 16))  # every bag empty
        if weighted and "MEAN" in poolings.values():
            continue  # torch's EmbeddingBag, under both collections, refuses weights with MEAN
        baseline = kind.EmbeddingBagCollection(configs(kind, poolings), is_weighted=weighted)
        baseline.load_state_dict(weights)
        with torch.inference_mode():
            in_process = baseline(kjt)
        assert in_process.keys() == names
        torch.testing.assert_close(got.values(), in_process.values(), **tolerance)


def requests(daemon, method: str) -> float:
    """embtier_requests_total of method (code OK), from the daemon's /metrics."""
    text = urllib.request.urlopen(f"http://{daemon.metrics}/metrics", timeout=10).read().decode()
    line = next((ln for ln in text.splitlines() if ln.startswith("embtier_requests_total{")
                 and f'method="{method}"' in ln and 'code="OK"' in ln), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def test_one_lookup_pooled_per_call_and_int32_ids(daemon, client):
    remote = RemoteEmbeddingBagCollection(configs(compat, POOLINGS["sum"]), client, table_prefix="count_")
    weights = trained_weights(1)
    remote.load_state_dict(weights)
    keys = ["a", "b", "c", "d"]
    values, lengths, _ = an_input(np.random.default_rng(3), keys)
    kjt = compat.KeyedJaggedTensor.from_lengths_sync(keys, values.to(torch.int32), lengths.to(torch.int32))
    before = requests(daemon, "LookupPooled")
    with torch.no_grad():
        for _ in range(3):
            got = remote(kjt)
    assert requests(daemon, "LookupPooled") - before == 3
    torch.testing.assert_close(got.values(), reference(weights, POOLINGS["sum"], keys, values, lengths, None))


# ---- loading and reading back -------------------------------------------------------------------------

def test_from_module_state_dict_round_trip_with_progress_and_dtype(client, monkeypatch):
    """from_module writes an in-process collection's tables in chunks (progress up to every row);
    state_dict() reads back exactly what was written; float16 storage and bfloat16 weights convert."""
    monkeypatch.setattr(tables, "CHUNK_BYTES", 4096)
    ebc = compat.EmbeddingBagCollection(configs(compat, POOLINGS["mean"]))
    seen: dict[str, list[int]] = {}
    remote = RemoteEmbeddingBagCollection.from_module(ebc, client, table_prefix="rt_",
                                                      progress=lambda t, done, total: seen.setdefault(t, []).append(
                                                          (done, total)))
    assert {t: calls[-1] for t, calls in seen.items()} == {f"rt_{n}": (rows, rows) for n, (rows, _) in SHAPES.items()}
    assert len(seen["rt_shared"]) == -(-1000 // (4096 // 32))  # 128 rows of 8 float32 a chunk
    read = remote.state_dict()
    assert list(read) == list(ebc.state_dict())
    for key, value in ebc.state_dict().items():
        assert torch.equal(read[key], value)
    bf16 = {k: v.to(torch.bfloat16) for k, v in trained_weights(2).items()}
    half = RemoteEmbeddingBagCollection(configs(compat, POOLINGS["sum"]), client, table_prefix="rt16_",
                                        storage_dtype="float16")
    half.load_state_dict(bf16)
    assert client.describe("rt16_shared").dtype == "float16"
    for key, value in half.state_dict().items():
        torch.testing.assert_close(value, bf16[key].float(), rtol=1e-3, atol=1e-4)


def test_fp16_config_makes_fp16_tables(client):
    remote = RemoteEmbeddingBagCollection(configs(compat, POOLINGS["sum"], "FP16"), client, table_prefix="cfg16_")
    remote.load_state_dict(trained_weights(4))
    assert {client.describe(f"cfg16_{n}").dtype for n in SHAPES} == {"float16"}


class Model(torch.nn.Module):
    def __init__(self, sparse: torch.nn.Module):
        super().__init__()
        self.dense = torch.nn.Linear(3, 2)
        self.sparse = sparse


def test_a_model_holding_the_collection_loads_and_saves_through_it(client):
    """model.load_state_dict(trained.state_dict()) writes the tables under the module's prefix;
    model.state_dict() reads them back; strict loading names what is missing or unexpected."""
    trained = Model(compat.EmbeddingBagCollection(configs(compat, POOLINGS["sum"])))
    served = Model(RemoteEmbeddingBagCollection(configs(compat, POOLINGS["sum"]), client, table_prefix="model_"))
    served.load_state_dict(trained.state_dict())
    saved = served.state_dict()
    for key, value in trained.state_dict().items():
        assert torch.equal(saved[key], value), key
    partial = {k: v for k, v in trained.state_dict().items() if "single" not in k}
    partial["sparse.embedding_bags.extra.weight"] = torch.zeros(2, 2)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*sparse\.embedding_bags\.single\.weight"
                       r"(.|\n)*Unexpected key\(s\).*sparse\.embedding_bags\.extra\.weight"):
        served.load_state_dict(partial)


def test_a_table_of_another_shape_is_refused_by_name(client):
    client.create_table("shape_shared", 10, 8)
    remote = RemoteEmbeddingBagCollection(configs(compat, POOLINGS["sum"]), client, table_prefix="shape_")
    with pytest.raises(RuntimeError, match=r"embtier table 'shape_shared' is 10 x 8 .* 1000 x 8"):
        remote.load_state_dict(trained_weights())
    with pytest.raises(RuntimeError, match=r"size mismatch for embedding_bags\.single\.weight"):
        remote.load_state_dict({**trained_weights(), "embedding_bags.single.weight": torch.zeros(3, 4)})


def test_import_torch_command(daemon, client, tmp_path):
    """embtier import-torch loads a saved model's embedding_bags.NAME.weight tables (any prefix, any
    float dtype), or the tensors named with --tensor."""
    trained = Model(compat.EmbeddingBagCollection(configs(compat, POOLINGS["sum"])))
    state = {k: (v.half() if k.endswith("single.weight") else v) for k, v in trained.state_dict().items()}
    path = tmp_path / "model.pt"
    torch.save({"model": state, "step": 7}, path)
    result = run_cli(daemon.target, "import-torch", str(path), "--prefix", "cli_")
    assert result.returncode == 0, result.stderr
    assert "cli_single: 500 x 4 float16 -> new float16 table" in result.stdout
    for name in SHAPES:
        got = tables.read_table(client, f"cli_{name}")
        torch.testing.assert_close(got, state[f"sparse.embedding_bags.{name}.weight"].float())
    plain = torch.nn.EmbeddingBag(20, 3)
    torch.save({"emb.weight": plain.weight.detach()}, tmp_path / "plain.pt")
    result = run_cli(daemon.target, "import-torch", str(tmp_path / "plain.pt"), "--tensor", "emb.weight=plain",
                     "--dtype", "float16")
    assert result.returncode == 0, result.stderr
    assert client.describe("plain").dtype == "float16"
    torch.testing.assert_close(tables.read_table(client, "plain"), plain.weight.detach(), rtol=1e-3, atol=1e-4)


def test_model_files_without_tables_are_refused_with_what_to_do(tmp_path):
    plain = torch.nn.EmbeddingBag(20, 3)
    torch.save(plain, tmp_path / "module.pt")
    with pytest.raises(ValueError, match=r"a pickled module\?.*torch\.save\(model\.state_dict\(\), path\)"):
        tables.tables_in_file(tmp_path / "module.pt")
    torch.save({"emb.weight": plain.weight.detach()}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"no embedding_bags\.NAME\.weight tensor.*its 2-D tensors: emb\.weight"):
        tables.tables_in_file(tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"no 2-D tensor 'emb'"):
        tables.tables_in_file(tmp_path / "plain.pt", {"emb": "t"})


# ---- errors --------------------------------------------------------------------------------------------

def test_errors_name_the_feature_or_table(client):
    remote = RemoteEmbeddingBagCollection(configs(compat, POOLINGS["sum"]), client, table_prefix="absent_")
    values, lengths, _ = an_input(np.random.default_rng(5), ["a", "b", "c", "d", "zzz"])
    extra = compat.KeyedJaggedTensor.from_lengths_sync(["a", "b", "c", "d", "zzz"], values, lengths)
    with pytest.raises(ValueError, match="feature 'zzz' of the input is not in this collection"):
        remote(extra)
    values, lengths, _ = an_input(np.random.default_rng(5), ["a", "c", "d"])
    short = compat.KeyedJaggedTensor.from_lengths_sync(["a", "c", "d"], values, lengths)
    with pytest.raises(ValueError, match="feature 'b' of table 'shared' is not in the input"):
        remote(short)
    values, lengths, _ = an_input(np.random.default_rng(5), ["a", "b", "c", "d"])
    full = compat.KeyedJaggedTensor.from_lengths_sync(["a", "b", "c", "d"], values, lengths)
    client.create_table("absent_single", 500, 4)
    with pytest.raises(EmbtierClientError, match=r"table 'absent_shared' \(features a, b\); table 'absent_other' "
                       r"\(features c, d\) not in the embtier daemon") as e:
        remote(full)
    assert e.value.code.name == "NOT_FOUND"
    weighted = RemoteEmbeddingBagCollection(configs(compat, POOLINGS["sum"]), client, is_weighted=True)
    with pytest.raises(ValueError, match="is_weighted=True"):
        weighted(full)


# ---- how inference code calls it ----------------------------------------------------------------------

class Batches(torch.utils.data.IterableDataset):
    """Inputs as a data loader yields them: (values, lengths) per batch."""

    def __init__(self, count: int, seed: int) -> None:
        self.count, self.seed = count, seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        for _ in range(self.count):
            values, lengths, _ = an_input(rng, ["a", "b", "c", "d"])
            yield values, lengths


def test_dataloader_loop_and_threads(client):
    """A DataLoader-style loop under inference_mode, and four threads sharing one collection: every
    output equals embedding_bag's."""
    weights = trained_weights(6)
    remote = RemoteEmbeddingBagCollection(configs(compat, POOLINGS["mixed"]), client, table_prefix="loop_")
    remote.load_state_dict(weights)
    keys = ["a", "b", "c", "d"]

    def check(values, lengths) -> None:
        kjt = compat.KeyedJaggedTensor.from_lengths_sync(keys, values, lengths)
        with torch.inference_mode():
            got = remote(kjt)
        torch.testing.assert_close(got.values(), reference(weights, POOLINGS["mixed"], keys, values, lengths, None))

    for values, lengths in torch.utils.data.DataLoader(Batches(5, 7), batch_size=None):
        check(values, lengths)
    failures: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for values, lengths in Batches(10, seed):
                check(values, lengths)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures


def test_dlrm_example_serves_the_predictions_it_trained(daemon, capsys):
    """The example end to end on the test's daemon: trained in process, tables exported, served with
    them in embtier; it exits 0 only when the predictions equal the in-process model's."""
    from embtier_tools.examples import dlrm

    assert dlrm.main(["--target", daemon.target, "--rows", "4000", "--steps", "5", "--batch", "64",
                      "--eval-batches", "3", "--torch-threads", str(torch.get_num_threads())]) == 0
    assert "largest |p(in process) - p(embtier)| = 0.00e+00" in capsys.readouterr().out


@pytest.mark.skipif(TORCHREC is None, reason="TorchRec does not import")
def test_drop_in_for_torchrecs_own_dlrm(client):
    """TorchRec's DLRM with its collection swapped for the remote one (as the README shows) predicts
    what it predicted in process."""
    from torchrec.models.dlrm import DLRM

    tables = [torchrec.EmbeddingBagConfig(num_embeddings=rows, embedding_dim=8, name=f"dlrm_{i}",
                                          feature_names=[f"f{i}"]) for i, rows in enumerate((1000, 500, 300))]
    model = DLRM(torchrec.EmbeddingBagCollection(tables), dense_in_features=5, dense_arch_layer_sizes=[16, 8],
                 over_arch_layer_sizes=[16, 1]).eval()
    keys = ["f0", "f1", "f2"]
    values, lengths, _ = an_input(np.random.default_rng(8), keys)
    kjt = torchrec.KeyedJaggedTensor.from_lengths_sync(keys, values, lengths)
    dense = torch.randn(BATCH, 5)
    with torch.inference_mode():
        in_process = model(dense, kjt)
    ebc = model.sparse_arch.embedding_bag_collection
    model.sparse_arch.embedding_bag_collection = RemoteEmbeddingBagCollection.from_module(ebc, client)
    with torch.inference_mode():
        torch.testing.assert_close(model(dense, kjt), in_process)
