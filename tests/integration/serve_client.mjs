// serve_client.mjs — drives `strata serve` from Node.
//
//   node serve_client.mjs basic BASE_URL API_KEY MODEL NPM_DIR
//       the official `openai` npm client (from NPM_DIR/node_modules): non-streaming and streaming
//       chat, completions, models list, and error cases (bad key -> 401, n=2 -> 400)
//   node serve_client.mjs model OUT_DIR TOKENIZER_DIR [LAYERS]
//       writes the test model: a tiny random Qwen3 (hidden 64, 2 layers, bf16) with the real
//       Qwen3 vocabulary (151936) and copies tokenizer.json / tokenizer_config.json next to it
//       (the synth presets' tiny models have a 512-token vocabulary the real tokenizer can't drive)
//   node serve_client.mjs load BASE_URL CLIENTS SECONDS [MAX_TOKENS]
//       CLIENTS concurrent streaming chat clients for SECONDS (each loops request after
//       request); prints one JSON line: requests, errors, tokens, TTFT p50/p99, tok/s
//
// Exits non-zero on any failure, printing what failed.
import { createRequire } from "node:module";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";

const [mode, base, ...rest] = process.argv.slice(2);
const fail = (msg) => { console.error("FAIL: " + msg); process.exit(1); };
const ok = (msg) => console.log("ok - " + msg);

async function basic(key, model, npmDir) {
  const require = createRequire(npmDir + "/package.json");
  const mod = require("openai");
  const OpenAI = mod.OpenAI || mod.default || mod;
  const client = new OpenAI({ baseURL: base + "/v1", apiKey: key, maxRetries: 0, timeout: 60000 });

  const models = await client.models.list();
  const ids = [];
  for await (const m of models) ids.push(m.id);
  if (!ids.includes(model)) fail(`models.list: ${JSON.stringify(ids)} lacks ${model}`);
  ok(`models.list -> ${ids.join(",")}`);

  const chat = await client.chat.completions.create({
    model, messages: [{ role: "system", content: "Be brief." }, { role: "user", content: "Say hello." }],
    max_tokens: 8, temperature: 0.7, seed: 42,
  });
  const c0 = chat.choices[0];
  if (chat.object !== "chat.completion" || c0.message.role !== "assistant" || typeof c0.message.content !== "string")
    fail("chat: bad shape " + JSON.stringify(chat));
  if (!chat.usage || chat.usage.completion_tokens < 1 || chat.usage.completion_tokens > 8) fail("chat: usage " + JSON.stringify(chat.usage));
  if (!["stop", "length"].includes(c0.finish_reason)) fail("chat: finish_reason " + c0.finish_reason);
  ok(`chat.completions (non-streaming): ${chat.usage.completion_tokens} tokens, finish ${c0.finish_reason}`);

  // same seed, same answer
  const again = await client.chat.completions.create({
    model, messages: [{ role: "system", content: "Be brief." }, { role: "user", content: "Say hello." }],
    max_tokens: 8, temperature: 0.7, seed: 42,
  });
  if (again.choices[0].message.content !== c0.message.content) fail("seeded chat is not reproducible");
  ok("seeded sampling is reproducible");

  const stream = await client.chat.completions.create({
    model, messages: [{ role: "user", content: "Count to five." }], max_tokens: 12, stream: true,
    stream_options: { include_usage: true }, logprobs: true, top_logprobs: 2,
  });
  let text = "", chunks = 0, usage = null, finish = null, lps = 0;
  for await (const ch of stream) {
    if (ch.object !== "chat.completion.chunk") fail("stream: object " + ch.object);
    if (ch.usage) usage = ch.usage;
    const c = ch.choices[0];
    if (!c) continue;
    if (c.delta && c.delta.content) { text += c.delta.content; chunks++; }
    if (c.logprobs && c.logprobs.content) lps += c.logprobs.content.length;
    if (c.finish_reason) finish = c.finish_reason;
  }
  if (!chunks || !usage || usage.completion_tokens !== 12 || finish !== "length") fail(`stream: chunks ${chunks} usage ${JSON.stringify(usage)} finish ${finish}`);
  if (lps !== 12) fail(`stream: ${lps} logprob entries for 12 tokens`);
  ok(`chat.completions (streaming): ${chunks} content chunks, ${usage.completion_tokens} tokens, logprobs for each`);

  const cmpl = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 6, temperature: 0 });
  if (cmpl.object !== "text_completion" || typeof cmpl.choices[0].text !== "string" || cmpl.usage.completion_tokens !== 6)
    fail("completions: " + JSON.stringify(cmpl));
  ok(`completions: "${cmpl.choices[0].text.replace(/\n/g, "\\n")}"`);

  const cs = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 6, temperature: 0, stream: true });
  let ctext = "";
  for await (const ch of cs) ctext += ch.choices[0] ? ch.choices[0].text : "";
  if (ctext !== cmpl.choices[0].text) fail(`completions stream "${ctext}" != "${cmpl.choices[0].text}" (greedy)`);
  ok("completions (streaming) equals the non-streaming greedy text");

  try {
    await client.chat.completions.create({ model, messages: [{ role: "user", content: "x" }], n: 2 });
    fail("n=2 was accepted");
  } catch (e) {
    if (!(e instanceof OpenAI.BadRequestError) || e.status !== 400 || e.param !== "n") fail("n=2: " + e);
    ok(`error case: n=2 -> ${e.status} (param ${e.param}): ${e.message}`);
  }
  const bad = new OpenAI({ baseURL: base + "/v1", apiKey: "wrong-key", maxRetries: 0 });
  try {
    await bad.models.list();
    fail("a wrong API key was accepted");
  } catch (e) {
    if (!(e instanceof OpenAI.AuthenticationError) || e.status !== 401) fail("bad key: " + e);
    ok(`error case: wrong API key -> ${e.status}`);
  }
  try {
    await client.chat.completions.create({ model: "no-such-model", messages: [{ role: "user", content: "x" }] });
    fail("an unknown model was accepted");
  } catch (e) {
    if (!(e instanceof OpenAI.NotFoundError) || e.status !== 404) fail("unknown model: " + e);
    ok(`error case: unknown model -> ${e.status}`);
  }
}

function writeModel(out, tokdir, layers) {
  const [V, H, L, NH, NKV, HD, FF] = [151936, 64, layers || 2, 2, 1, 32, 128];
  fs.mkdirSync(out, { recursive: true });
  const cfg = { architectures: ["Qwen3ForCausalLM"], model_type: "qwen3", hidden_size: H, intermediate_size: FF,
    num_hidden_layers: L, num_attention_heads: NH, num_key_value_heads: NKV, head_dim: HD, vocab_size: V,
    max_position_embeddings: 4096, rms_norm_eps: 1e-6, rope_theta: 1000000.0, tie_word_embeddings: true,
    torch_dtype: "bfloat16", bos_token_id: 151643, eos_token_id: 151645, hidden_act: "silu" };
  fs.writeFileSync(path.join(out, "config.json"), JSON.stringify(cfg, null, 1));
  fs.writeFileSync(path.join(out, "generation_config.json"), JSON.stringify({ eos_token_id: [151645, 151643] }));
  // [name, shape, bf16 high byte (0x3d: |w| in [1/32, 1/16), 0x3e: [1/8, 1/4)) or null = ones]
  const t = [["model.embed_tokens.weight", [V, H], 0x3d], ["model.norm.weight", [H], null]];
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}.`;
    t.push([p + "input_layernorm.weight", [H], null], [p + "post_attention_layernorm.weight", [H], null],
      [p + "self_attn.q_proj.weight", [NH * HD, H], 0x3e], [p + "self_attn.k_proj.weight", [NKV * HD, H], 0x3e],
      [p + "self_attn.v_proj.weight", [NKV * HD, H], 0x3e], [p + "self_attn.o_proj.weight", [H, NH * HD], 0x3e],
      [p + "self_attn.q_norm.weight", [HD], null], [p + "self_attn.k_norm.weight", [HD], null],
      [p + "mlp.gate_proj.weight", [FF, H], 0x3e], [p + "mlp.up_proj.weight", [FF, H], 0x3e],
      [p + "mlp.down_proj.weight", [H, FF], 0x3d]);
  }
  const header = {}, blobs = [];
  let off = 0;
  for (const [name, shape, hi] of t) {
    const n = shape.reduce((a, b) => a * b, 1), b = Buffer.alloc(2 * n);
    if (hi === null) for (let i = 0; i < n; i++) b.writeUInt16LE(0x3f80, 2 * i);
    else {
      const r = randomBytes(2 * n);   // random mantissa byte, random sign, fixed exponent
      for (let i = 0; i < n; i++) { b[2 * i] = r[2 * i]; b[2 * i + 1] = hi | (r[2 * i + 1] & 0x80); }
    }
    header[name] = { dtype: "BF16", shape, data_offsets: [off, off + b.length] };
    blobs.push(b); off += b.length;
  }
  header.__metadata__ = { format: "pt" };
  let h = JSON.stringify(header);
  h += " ".repeat((8 - (h.length % 8)) % 8);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(h.length));
  fs.writeFileSync(path.join(out, "model.safetensors"), Buffer.concat([len, Buffer.from(h), ...blobs]));
  for (const f of ["tokenizer.json", "tokenizer_config.json"]) fs.copyFileSync(path.join(tokdir, f), path.join(out, f));
  ok(`wrote ${out}`);
}

function pct(a, p) {
  if (!a.length) return NaN;
  const s = [...a].sort((x, y) => x - y);
  return s[Math.min(s.length - 1, Math.floor(p * s.length))];
}

async function load(clients, seconds, maxTokens) {
  const end = Date.now() + seconds * 1000;
  const ttft = [], errors = [];
  let requests = 0, tokens = 0;
  async function one(i) {
    while (Date.now() < end) {
      const t0 = performance.now();
      let first = 0, n = 0, done = false;
      try {
        const r = await fetch(base + "/v1/chat/completions", {
          method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ messages: [{ role: "user", content: `Client ${i} says hello, request ${requests}.` }],
                                 max_tokens: maxTokens, stream: true }),
        });
        if (r.status !== 200) throw new Error("HTTP " + r.status + " " + (await r.text()));
        const rd = r.body.getReader(), dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done: d } = await rd.read();
          if (d) break;
          buf += dec.decode(value, { stream: true });
          let k;
          while ((k = buf.indexOf("\n\n")) >= 0) {
            const ev = buf.slice(0, k); buf = buf.slice(k + 2);
            if (!ev.startsWith("data: ")) continue;
            const data = ev.slice(6);
            if (data === "[DONE]") { done = true; continue; }
            const j = JSON.parse(data);
            if (j.error) throw new Error(j.error.message);
            const c = j.choices[0];
            if (c && c.delta && c.delta.content) { if (!first) first = performance.now(); n++; }
            if (j.usage) tokens += j.usage.completion_tokens;
          }
        }
        if (!done) throw new Error("stream ended without [DONE]");
        requests++;
        if (first) ttft.push(first - t0);
      } catch (e) {
        errors.push(String(e));
      }
    }
  }
  const t0 = Date.now();
  await Promise.all(Array.from({ length: clients }, (_, i) => one(i)));
  const wall = (Date.now() - t0) / 1000;
  const res = { clients, seconds, requests, errors: errors.length, tokens, tokens_per_s: +(tokens / wall).toFixed(1),
                ttft_p50_ms: +pct(ttft, 0.5).toFixed(1), ttft_p99_ms: +pct(ttft, 0.99).toFixed(1), wall_s: +wall.toFixed(1) };
  console.log(JSON.stringify(res));
  if (errors.length) { console.error("first errors:", errors.slice(0, 5)); process.exit(1); }
  if (!requests) fail("no request completed");
}

try {
  if (mode === "basic") await basic(rest[0], rest[1], rest[2]);
  else if (mode === "model") writeModel(base, rest[0], parseInt(rest[1] || "2"));
  else if (mode === "load") await load(parseInt(rest[0]), parseFloat(rest[1]), parseInt(rest[2] || "16"));
  else fail("usage: serve_client.mjs basic|model|load ...");
} catch (e) {
  fail(e.stack || String(e));
}
