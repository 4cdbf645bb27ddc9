// The browser console: plain JavaScript over the documented HTTP API, nothing else.
// Every text a server or user gave is put in the page with textContent, never as HTML.
"use strict";

// A number typed into a text field stays a number only when it reads as one both ways:
// "02139" (a zip code) or "1e3" must stay text, or an "is" filter would miss them.
const NUMBER = /^-?(0|[1-9]\d*)(\.\d+)?$/;
const OPERATORS = ["contains", "not contains", "start with", "end with", "is", "is not",
  "empty", "not empty", "in", "not in", "=", "≠", ">", "<", "≥", "≤", "before", "after"];
const VALUELESS = new Set(["empty", "not empty"]);
const KEY_STORE = "llamaindex_kb.api_key";

const TEXTS = {
  en: {
    signedInAs: "Signed in", adminKey: "admin key", namedKey: "key", view: "view",
    knowledgeBaseKind: "knowledge base", drop: "Drop", delete: "Delete", revoke: "Revoke",
    confirmDrop: "Drop knowledge base “{id}” and all its documents? This cannot be undone.",
    confirmDeleteDoc: "Delete “{name}” from “{id}”?", confirmDeleteView: "Delete view “{name}”?",
    confirmRevoke: "Revoke key “{name}”? Apps using it stop working at once.",
    uploading: "uploading…", processing: "processing…", chunksDone: "{n} chunks", oneChunk: "1 chunk",
    noResults: "No records.", semantic: "semantic", keyword: "keyword", rerank: "rerank",
    weight: "weight", never: "never", all: "all", readOnlyAccess: "read-only",
    readWriteAccess: "read-write", noBase: "No knowledge base yet.", badJson: "The filter is not valid JSON: {error}",
    keyRejected: "This key was not accepted: {error}", valuePlaceholder: "value (a, b for in)",
    key: "key", removeRow: "Remove", none: "—", title: "LlamaIndex Knowledge Base",
    asBuilt: "As built", general: "General", parentChild: "Parent-child", modeKeyword: "Keyword",
    modeHybrid: "Hybrid", modeVector: "Vector", name: "Name", value: "value", mode: "Mode",
    topKMax: "Top K at most", missingIds: "not found",
    paragraph: "paragraph", fullDoc: "full document", networkError: "The server could not be reached.",
    signedOutRejected: "The key is no longer accepted: sign in again.",
  },
  zh: {
    title: "LlamaIndex 知识库", signOut: "退出", apiKey: "API 密钥", signIn: "登录",
    signInHint: "端点的 API 密钥，或命名密钥。仅保存在当前标签页中。",
    tabBases: "知识库", tabDocuments: "文档", tabRetrieval: "召回测试", tabAccess: "视图与密钥",
    tabConnect: "连接 Dify", knowledgeId: "知识库 ID", kind: "类型", documents: "文档数",
    chunks: "分段数", mode: "检索模式", embedding: "嵌入模型", chunking: "分段设置",
    createBase: "创建知识库", modeHybrid: "混合检索", modeVector: "向量检索", modeKeyword: "关键词检索",
    semanticWeight: "语义权重", embeddingAuto: "自动（按语言）", embeddingEnglish: "内置英文模型",
    embeddingMultilingual: "内置多语言模型", embeddingServer: "服务器配置的模型", general: "通用",
    parentChild: "父子分段", delimiter: "分段标识符", maxTokens: "分段最大长度（token）",
    overlap: "分段重叠长度（token）", parentMode: "父块", paragraph: "段落", fullDoc: "全文",
    parentDelimiter: "父块分段标识符", parentMaxTokens: "父块最大长度（token）",
    childDelimiter: "子块分段标识符", childMaxTokens: "子块最大长度（token）", create: "创建",
    knowledgeBase: "知识库", dropHere: "拖放文件到此处，或", metadata: "元数据（可选）",
    addRow: "添加一行", upload: "上传", fileName: "文件名", type: "类型", size: "大小",
    query: "查询", asBuilt: "按构建时设置", filter: "元数据过滤", match: "满足",
    matchAll: "全部（and）", matchAny: "任一（or）", all: "全部", addCondition: "添加条件", search: "检索",
    views: "视图", name: "名称", settings: "设置",
    filterJson: "过滤条件（Dify 的 metadata_condition JSON）", useTestFilter: "使用召回测试中的过滤条件",
    createView: "创建视图", keys: "API 密钥", scope: "范围", access: "权限", created: "创建时间",
    lastUsed: "最近使用", keyScope: "知识库与视图（逗号分隔；留空表示全部）", readOnly: "只读",
    createKey: "创建密钥", newKeyOnce: "新密钥仅显示这一次，请立即复制。", connectTitle: "连接 Dify",
    connectStep1: "在 Dify 中：知识库 → 外部知识库 API → 添加。粘贴此端点（不含 /retrieval）和一个 API 密钥：",
    connectStep2: "然后用以下任一知识库 ID 创建外部知识库：",
    connectTraps: "出现“failed to connect to the endpoint”或“blocked by SSRF protection”时，多半是密钥错误：Dify 会把经其 Squid 代理转发的任何 403 当作 SSRF 拦截，请先检查密钥。否则是代理拒绝了该地址：Dify 1.15 及以上需在 docker/.env 中放行私有地址（SSRF_PROXY_ALLOW_PRIVATE_IPS）；使用插件时，ENDPOINT_URL_TEMPLATE 必须是 Dify api 容器可访问的地址。",
    signedInAs: "已登录", adminKey: "管理员密钥", namedKey: "密钥", view: "视图",
    knowledgeBaseKind: "知识库", drop: "删除", delete: "删除", revoke: "吊销",
    confirmDrop: "删除知识库“{id}”及其全部文档？此操作无法撤销。",
    confirmDeleteDoc: "从“{id}”中删除“{name}”？", confirmDeleteView: "删除视图“{name}”？",
    confirmRevoke: "吊销密钥“{name}”？使用它的应用将立即失效。",
    uploading: "上传中…", processing: "处理中…", chunksDone: "{n} 个分段", oneChunk: "1 个分段",
    noResults: "没有结果。", semantic: "语义", keyword: "关键词", rerank: "重排序",
    weight: "权重", never: "从未", readOnlyAccess: "只读", readWriteAccess: "读写",
    noBase: "还没有知识库。", badJson: "过滤条件不是有效的 JSON：{error}",
    keyRejected: "密钥未被接受：{error}", valuePlaceholder: "值（in 用 a, b）",
    key: "键", removeRow: "移除", none: "—", value: "值", topK: "Top K", scoreThreshold: "分数阈值",
    topKMax: "Top K 上限", missingIds: "不存在", networkError: "无法连接服务器。", signedOutRejected: "密钥已不再有效，请重新登录。",
    op_contains: "包含", "op_not contains": "不包含", "op_start with": "开始是", "op_end with": "结束是",
    op_is: "是", "op_is not": "不是", op_empty: "为空", "op_not empty": "不为空", op_in: "属于",
    "op_not in": "不属于", op_before: "早于", op_after: "晚于",
  },
};
const LANG = (navigator.languages || [navigator.language || "en"])
  .some((l) => l.toLowerCase().startsWith("zh")) ? "zh" : "en";

function t(key, values = {}) {
  const text = (TEXTS[LANG] && TEXTS[LANG][key]) || TEXTS.en[key] || key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(values[name] ?? ""));
}

// The API lives beside the console: /console → /, /e/<id>/console → /e/<id>/.
const BASE = location.pathname.replace(/\/console\/?$/, "");
const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error_msg ? body.error_msg : `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error_code;
  }
}

const state = { key: sessionStorage.getItem(KEY_STORE), entries: [], admin: false, canWrite: false };

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.key}` };
  const options = { method, headers, credentials: "omit", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try { response = await fetch(BASE + path, options); } catch {
    throw new Error(t("networkError"));
  }
  let answer = null;
  try { answer = await response.json(); } catch { answer = null; }
  if (!response.ok) throw new ApiError(response.status, answer);
  return answer;
}

function showError(error, where = "#app-error") {
  $(where).textContent = error ? (error.message || String(error)) : "";
}

function translatePage() {
  document.documentElement.lang = LANG === "zh" ? "zh-Hans" : "en";
  for (const node of $$("[data-i18n]")) {
    const key = node.dataset.i18n;
    if (TEXTS[LANG][key]) node.textContent = TEXTS[LANG][key];
  }
  document.title = t("title");
}

// --- signing in -----------------------------------------------------------------------

async function signIn(key) {
  state.key = key;
  // What this key may do (GET /me): the page offers only that.
  const me = await api("GET", "/me");
  state.admin = me.admin;
  state.canWrite = !me.read_only;
  // A key limited to some knowledge ids cannot create others: no form that would fail.
  state.canCreate = state.canWrite && me.knowledge_ids === null;
  await loadBases();
  sessionStorage.setItem(KEY_STORE, key);
  $("#sign-in").hidden = true;
  $("#app").hidden = false;
  $("#sign-out").hidden = false;
  $("#who").textContent = `${t("signedInAs")} · ${me.admin ? t("adminKey") : `${t("namedKey")} ${me.name}`}`;
  for (const node of $$("#tab-access, [data-tab=access]")) node.hidden = !state.admin;
  $("#create-base").hidden = !state.canCreate;
  $("#upload-form").hidden = !state.canWrite;
  showTab("bases");
}

function signOut() {
  sessionStorage.removeItem(KEY_STORE);
  location.reload();
}

// --- knowledge bases ------------------------------------------------------------------

async function loadBases() {
  const answer = await api("GET", "/knowledge-bases");
  state.entries = answer.knowledge_bases;
  renderBases();
  fillBaseSelects();
  renderConnect();
}

function modeName(mode) {
  return mode ? t(`mode${mode[0].toUpperCase()}${mode.slice(1)}`) : t("asBuilt");
}

function describeChunking(chunking) {
  if (!chunking || !chunking.mode) return t("none");
  if (chunking.mode === "parent_child") {
    return `${t("parentChild")} (${chunking.parent_mode === "full_doc" ? t("fullDoc") : t("paragraph")}, ` +
      `${chunking.parent_max_tokens ?? "?"}/${chunking.child_max_tokens ?? "?"})`;
  }
  return `${t("general")} (${chunking.max_tokens ?? "?"}, ${chunking.overlap ?? 0})`;
}

function renderBases() {
  const body = $("#bases-table tbody");
  body.replaceChildren();
  if (!state.entries.length) {
    body.append(el("tr", {}, el("td", { colspan: 8, text: t("noBase") })));
    return;
  }
  for (const entry of state.entries) {
    const isView = entry.kind === "view";
    const drop = state.canWrite && !isView
      ? el("button", { type: "button", class: "danger", text: t("drop"),
        onclick: () => dropBase(entry.knowledge_id) })
      : null;
    body.append(el("tr", { "data-id": entry.knowledge_id },
      el("td", { class: "mono", text: entry.knowledge_id }),
      el("td", { text: !isView ? t("knowledgeBaseKind")
        : entry.knowledge_base ? `${t("view")} → ${entry.knowledge_base}` : t("view") }),
      el("td", { class: "num", text: isView ? t("none") : String(entry.documents ?? "?") }),
      el("td", { class: "num", text: isView ? t("none") : String(entry.chunks ?? "?") }),
      el("td", { text: modeName(entry.retrieval_mode) }),
      el("td", { class: "mono", text: isView ? t("none") : (entry.embedding ? entry.embedding.id : t("modeKeyword")) }),
      el("td", { text: isView ? t("none") : describeChunking(entry.chunking) }),
      el("td", {}, drop)));
  }
}

function fillBaseSelects() {
  for (const select of $$(".base-select")) {
    const chosen = select.value;
    const entries = select.classList.contains("bases-only")
      ? state.entries.filter((entry) => entry.kind !== "view") : state.entries;
    select.replaceChildren(...entries.map((entry) => el("option", {
      value: entry.knowledge_id, text: entry.kind === "view"
        ? `${entry.knowledge_id} (${t("view")})` : entry.knowledge_id })));
    if (entries.some((entry) => entry.knowledge_id === chosen)) select.value = chosen;
  }
}

async function dropBase(id) {
  if (!confirm(t("confirmDrop", { id }))) return;
  await guarded(async () => { await api("DELETE", `/knowledge-bases/${encodeURIComponent(id)}`); await loadBases(); });
}

function chunkingFrom(form) {
  const data = new FormData(form);
  const mode = data.get("chunk_mode");
  if (mode === "parent_child") {
    return { mode, parent_mode: data.get("parent_mode"), parent_delimiter: data.get("parent_delimiter"),
      parent_max_tokens: Number(data.get("parent_max_tokens")),
      child_delimiter: data.get("child_delimiter"), child_max_tokens: Number(data.get("child_max_tokens")) };
  }
  return { mode, delimiter: data.get("delimiter"), max_tokens: Number(data.get("max_tokens")),
    overlap: Number(data.get("overlap")) };
}

async function createBase(event) {
  event.preventDefault();
  const form = event.target;
  const data = new FormData(form);
  await guarded(async () => {
    await api("POST", "/knowledge-bases", {
      knowledge_id: data.get("knowledge_id"), retrieval_mode: data.get("retrieval_mode"),
      semantic_weight: data.get("semantic_weight") === "" ? null : Number(data.get("semantic_weight")),
      embedding: data.get("embedding"), chunking: chunkingFrom(form) });
    form.reset();
    showChunkingFields();
    await loadBases();
  });
}

function showChunkingFields() {
  const parentChild = $("[name=chunk_mode]:checked").value === "parent_child";
  $(".general-only").hidden = parentChild;
  $(".parent-child-only").hidden = !parentChild;
}

// --- documents ------------------------------------------------------------------------

function selectedBase() { return $("#documents-base").value; }

async function loadDocuments() {
  const body = $("#documents-table tbody");
  const id = selectedBase();
  if (!id) { body.replaceChildren(); return; }
  const answer = await api("GET", `/knowledge-bases/${encodeURIComponent(id)}/documents`);
  const isView = (state.entries.find((entry) => entry.knowledge_id === id) || {}).kind === "view";
  $("#upload-form").hidden = !state.canWrite || isView;  // views are read-only
  // Replaced only once the answer is in: the table never shows empty in between.
  body.replaceChildren(...answer.documents.map((doc) => {
    const remove = state.canWrite && !isView
      ? el("button", { type: "button", class: "danger", text: t("delete"),
        onclick: () => deleteDocument(id, doc) }) : null;
    return el("tr", { "data-document": doc.document_id },
      el("td", { text: doc.file_name || doc.title }),
      el("td", { text: doc.file_type || t("none") }),
      el("td", { class: "num", text: doc.file_size == null ? t("none") : formatSize(doc.file_size) }),
      el("td", { class: "num", text: String(doc.chunks ?? "?") }),
      el("td", { class: "mono", text: Object.keys(doc.metadata || {}).length ? JSON.stringify(doc.metadata) : "" }),
      el("td", {}, remove));
  }));
}

function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

async function deleteDocument(id, doc) {
  if (!confirm(t("confirmDeleteDoc", { id, name: doc.file_name || doc.title }))) return;
  await guarded(async () => {
    await api("DELETE", `/knowledge-bases/${encodeURIComponent(id)}/documents/${doc.document_id.split("/").map(encodeURIComponent).join("/")}`);
    await loadDocuments();
    await loadBases();
  });
}

function addMetadataRow() {
  const row = el("div", { class: "row" },
    el("input", { name: "meta_key", placeholder: t("key") }),
    el("input", { name: "meta_value", placeholder: t("value") }));
  row.append(el("button", { type: "button", text: t("removeRow"), onclick: () => row.remove() }));
  $("#metadata-rows").append(row);
}

function metadataFromRows() {
  const metadata = {};
  for (const row of $$("#metadata-rows .row")) {
    const key = $("[name=meta_key]", row).value.trim();
    const raw = $("[name=meta_value]", row).value;
    if (!key) continue;
    // Numbers stay numbers, so that ">" and "<" filters work on them.
    metadata[key] = NUMBER.test(raw.trim()) ? Number(raw) : raw;
  }
  return metadata;
}

// XMLHttpRequest, not fetch: only it reports upload progress.
function uploadOne(file, id, metadata, row) {
  return new Promise((resolve) => {
    const bar = $("progress", row);
    const status = $(".status", row);
    const form = new FormData();
    form.append("knowledge_id", id);
    if (Object.keys(metadata).length) form.append("metadata", JSON.stringify(metadata));
    form.append("file", file, file.name);
    const request = new XMLHttpRequest();
    request.open("POST", `${BASE}/documents`);
    request.setRequestHeader("Authorization", `Bearer ${state.key}`);
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) bar.value = event.loaded / event.total;
      if (event.loaded === event.total) status.textContent = t("processing");
    });
    request.addEventListener("load", () => {
      let answer = null;
      try { answer = JSON.parse(request.responseText); } catch { answer = null; }
      bar.value = 1;
      if (request.status === 201 && answer) {
        const n = answer.document.chunks;
        status.textContent = n === 1 ? t("oneChunk") : t("chunksDone", { n });
        status.className = "status ok";
      } else {
        status.textContent = answer && answer.error_msg ? answer.error_msg : `HTTP ${request.status}`;
        status.className = "status error";
      }
      resolve();
    });
    request.addEventListener("error", () => {
      status.textContent = t("networkError");
      status.className = "status error";
      resolve();
    });
    request.send(form);
  });
}

async function uploadFiles(files) {
  const id = selectedBase();
  if (!id || !files.length) return;
  const metadata = metadataFromRows();
  const list = $("#upload-progress");
  list.replaceChildren();
  $("#upload-button").disabled = true;
  $("#file-input").disabled = true;
  const rows = files.map((file) => {
    const row = el("li", { "data-file": file.name }, el("span", { text: file.name }),
      el("progress", { max: 1, value: 0 }), el("span", { class: "status", text: t("uploading") }));
    list.append(row);
    return row;
  });
  // One at a time: the server embeds one upload at a time and answers 429 to another.
  try {
    for (let i = 0; i < files.length; i += 1) await uploadOne(files[i], id, metadata, rows[i]);
  } finally {
    $("#upload-button").disabled = false;
    $("#file-input").disabled = false;
    $("#file-input").value = "";
  }
  await guarded(async () => { await loadDocuments(); await loadBases(); });
}

// --- retrieval test -------------------------------------------------------------------

function addCondition(container) {
  const operator = el("select", { name: "comparison_operator" },
    ...OPERATORS.map((op) => el("option", { value: op, text: t(`op_${op}`) === `op_${op}` ? op : t(`op_${op}`) })));
  const value = el("input", { name: "value", placeholder: t("valuePlaceholder") });
  operator.addEventListener("change", () => { value.disabled = VALUELESS.has(operator.value); });
  const row = el("div", { class: "row condition" },
    el("input", { name: "name", placeholder: t("name") }), operator, value);
  row.append(el("button", { type: "button", text: t("removeRow"), onclick: () => row.remove() }));
  container.append(row);
}

function conditionFrom(fieldset) {
  const conditions = [];
  for (const row of $$(".condition", fieldset)) {
    const name = $("[name=name]", row).value.trim();
    if (!name) continue;
    const op = $("[name=comparison_operator]", row).value;
    const raw = $("[name=value]", row).value;
    let value = null;
    if (!VALUELESS.has(op)) {
      if (op === "in" || op === "not in") value = raw.split(",").map((item) => item.trim()).filter(Boolean);
      else if ([">", "<", "≥", "≤", "=", "≠"].includes(op) && NUMBER.test(raw.trim())) value = Number(raw);
      else value = raw;
    }
    conditions.push({ name, comparison_operator: op, value });
  }
  if (!conditions.length) return null;
  return { logical_operator: $("[name=logical_operator]", fieldset).value, conditions };
}

async function runRetrieval(event) {
  event.preventDefault();
  const data = new FormData(event.target);
  const setting = { top_k: Number(data.get("top_k")), score_threshold: Number(data.get("score_threshold")) };
  if (data.get("retrieval_mode")) setting.retrieval_mode = data.get("retrieval_mode");
  if (data.get("semantic_weight") !== "") setting.semantic_weight = Number(data.get("semantic_weight"));
  const body = { knowledge_id: data.get("knowledge_id"), query: data.get("query"),
    retrieval_setting: setting, explain: true };
  const condition = conditionFrom($("#filter-builder"));
  if (condition) body.metadata_condition = condition;
  const list = $("#results");
  list.replaceChildren();
  await guarded(async () => {
    const answer = await api("POST", "/retrieval", body);
    if (!answer.records.length) list.append(el("li", { text: t("noResults") }));
    for (const record of answer.records) list.append(renderRecord(record));
  });
}

function part(value) { return value == null ? t("none") : value.toFixed(3); }

function renderRecord(record) {
  const parts = record.score_parts;
  const explained = parts ? el("span", { class: "parts", text:
    ` · ${modeName(parts.mode)} · ${t("semantic")} ${part(parts.semantic)} · ${t("keyword")} ${part(parts.keyword)}` +
    ` · ${t("weight")} ${part(parts.semantic_weight)}` +
    (parts.rerank == null ? "" : ` · ${t("rerank")} ${part(parts.rerank)}`) }) : null;
  return el("li", { class: "record" },
    el("div", {}, el("strong", { text: record.title }), " ",
      el("span", { class: "score", text: record.score.toFixed(3) }), explained),
    el("div", { class: "content", text: record.content }),
    el("div", { class: "meta mono", text: JSON.stringify(record.metadata) }));
}

// --- views and keys -------------------------------------------------------------------

async function loadAccess() {
  if (!state.admin) return;
  const [views, keys] = await Promise.all([api("GET", "/views"), api("GET", "/keys")]);
  const viewRows = $("#views-table tbody");
  viewRows.replaceChildren(...views.views.map((view) => el("tr", { "data-view": view.knowledge_id },
    el("td", { class: "mono", text: view.knowledge_id }),
    el("td", { class: "mono", text: view.knowledge_base }),
    el("td", { class: "mono", text: view.metadata_condition ? JSON.stringify(view.metadata_condition) : t("none") }),
    el("td", { text: [[t("mode"), view.retrieval_mode && modeName(view.retrieval_mode)],
      [t("weight"), view.semantic_weight], [t("topKMax"), view.top_k_max]]
      .filter(([, v]) => v != null).map(([k, v]) => `${k} ${v}`).join(", ") || t("asBuilt") }),
    el("td", {}, el("button", { type: "button", class: "danger", text: t("delete"),
      onclick: () => deleteView(view.knowledge_id) })))));
  const keyRows = $("#keys-table tbody");
  keyRows.replaceChildren(...keys.keys.map((key) => el("tr", { "data-key": key.name },
    el("td", { class: "mono", text: key.name }),
    el("td", { class: "mono", text: (key.knowledge_ids ? key.knowledge_ids.join(", ") : t("all")) +
      (key.missing && key.missing.length ? ` (${t("missingIds")}: ${key.missing.join(", ")})` : "") }),
    el("td", { text: key.read_only ? t("readOnlyAccess") : t("readWriteAccess") }),
    el("td", { text: when(key.created_at) }),
    el("td", { text: key.last_used_at ? when(key.last_used_at) : t("never") }),
    el("td", {}, el("button", { type: "button", class: "danger", text: t("revoke"),
      onclick: () => revokeKey(key.name) })))));
}

function when(seconds) { return new Date(seconds * 1000).toLocaleString(LANG === "zh" ? "zh-CN" : undefined); }

async function createView(event) {
  event.preventDefault();
  const data = new FormData(event.target);
  const body = { name: data.get("name"), knowledge_base: data.get("knowledge_base") };
  const filter = data.get("metadata_condition").trim();
  if (filter) {
    try { body.metadata_condition = JSON.parse(filter); } catch (error) {
      showError(new Error(t("badJson", { error: error.message })));
      return;
    }
  }
  if (data.get("retrieval_mode")) body.retrieval_mode = data.get("retrieval_mode");
  if (data.get("semantic_weight") !== "") body.semantic_weight = Number(data.get("semantic_weight"));
  if (data.get("top_k_max") !== "") body.top_k_max = Number(data.get("top_k_max"));
  await guarded(async () => {
    await api("POST", "/views", body);
    event.target.reset();
    await Promise.all([loadAccess(), loadBases()]);
  });
}

async function deleteView(name) {
  if (!confirm(t("confirmDeleteView", { name }))) return;
  await guarded(async () => {
    await api("DELETE", `/views/${encodeURIComponent(name)}`);
    await Promise.all([loadAccess(), loadBases()]);
  });
}

async function createKey(event) {
  event.preventDefault();
  const data = new FormData(event.target);
  const scope = data.get("knowledge_ids").split(",").map((id) => id.trim()).filter(Boolean);
  await guarded(async () => {
    const answer = await api("POST", "/keys", { name: data.get("name"),
      knowledge_ids: scope.length ? scope : null, read_only: data.get("read_only") === "on" });
    $("#new-key-secret").textContent = answer.key;
    $("#new-key").hidden = false;
    event.target.reset();
    await loadAccess();
  });
}

async function revokeKey(name) {
  if (!confirm(t("confirmRevoke", { name }))) return;
  await guarded(async () => { await api("DELETE", `/keys/${encodeURIComponent(name)}`); await loadAccess(); });
}

// --- connect to Dify ------------------------------------------------------------------

function renderConnect() {
  $("#endpoint-url").textContent = location.origin + BASE;
  $("#connect-ids").replaceChildren(...state.entries.map((entry) => el("li", {},
    el("code", { text: entry.knowledge_id }),
    entry.kind !== "view" ? "" : entry.knowledge_base
      ? ` (${t("view")} → ${entry.knowledge_base})` : ` (${t("view")})`)));
}

// --- wiring ---------------------------------------------------------------------------

async function guarded(work) {
  showError(null);
  try { await work(); } catch (error) {
    showError(error);
    if (error.status === 403) await checkStillSignedIn();
  }
}

// A 403 may be this key's scope (read-only), or the key revoked meanwhile: only then
// does /me fail too, and the page goes back to the sign-in form.
async function checkStillSignedIn() {
  try { await api("GET", "/me"); } catch (error) {
    if (error.status !== 403) return;
    sessionStorage.removeItem(KEY_STORE);
    state.key = null;
    $("#app").hidden = true;
    $("#sign-out").hidden = true;
    $("#who").textContent = "";
    $("#sign-in").hidden = false;
    $("#sign-in-error").textContent = t("signedOutRejected");
  }
}

function showTab(name) {
  $("#new-key").hidden = true;  // a secret is shown once, not left on screen
  for (const button of $$("nav button")) button.classList.toggle("active", button.dataset.tab === name);
  for (const tab of $$(".tab")) tab.hidden = tab.id !== `tab-${name}`;
  if (name === "documents") guarded(loadDocuments);
  if (name === "access") guarded(loadAccess);
}

function wire() {
  translatePage();
  $("#sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = new FormData(event.target).get("api_key").trim();
    try { await signIn(key); } catch (error) {
      showError(new Error(t("keyRejected", { error: error.message })), "#sign-in-error");
    }
  });
  $("#sign-out").addEventListener("click", signOut);
  for (const button of $$("nav button")) button.addEventListener("click", () => showTab(button.dataset.tab));
  $("#create-base").addEventListener("submit", createBase);
  for (const radio of $$("[name=chunk_mode]")) radio.addEventListener("change", showChunkingFields);
  $("#documents-base").addEventListener("change", () => guarded(loadDocuments));
  $("#add-metadata").addEventListener("click", addMetadataRow);
  $("#upload-form").addEventListener("submit", (event) => {
    event.preventDefault();
    uploadFiles(Array.from($("#file-input").files));
  });
  const zone = $("#dropzone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (!$("#upload-button").disabled) uploadFiles(Array.from(event.dataTransfer.files));
  });
  // A file dropped beside the zone must not make the browser leave the page to open it.
  for (const name of ["dragover", "drop"]) document.addEventListener(name, (event) => event.preventDefault());
  $(".add-condition").addEventListener("click", () => addCondition($("#filter-builder .condition-rows")));
  $("#retrieval-form").addEventListener("submit", runRetrieval);
  $("#create-view").addEventListener("submit", createView);
  $("#filter-from-test").addEventListener("click", () => {
    const condition = conditionFrom($("#filter-builder"));
    $("#create-view [name=metadata_condition]").value = condition ? JSON.stringify(condition) : "";
  });
  $("#create-key").addEventListener("submit", createKey);
  if (state.key) {
    signIn(state.key).catch((error) => {
      sessionStorage.removeItem(KEY_STORE);
      state.key = null;
      showError(new Error(t("keyRejected", { error: error.message })), "#sign-in-error");
    });
  }
}

wire();
