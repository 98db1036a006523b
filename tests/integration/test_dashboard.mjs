// test_dashboard.mjs — the dashboard in headless Chromium (playwright-core + Debian's chromium):
// loads the page, checks topology / placement / KV panels, sends a chat message, watches the
// answer stream in (several distinct partial texts before the end), takes a screenshot.
//
//   node test_dashboard.mjs BASE_URL NPM_DIR SCREENSHOT.png [CHROMIUM]
import { createRequire } from "node:module";

const [base, npmDir, shot, exe = "/usr/bin/chromium"] = process.argv.slice(2);
const require = createRequire(npmDir + "/package.json");
const { chromium } = require("playwright-core");
const fail = (m) => { console.error("FAIL: " + m); process.exitCode = 1; };
const ok = (m) => console.log("ok - " + m);

const browser = await chromium.launch({ executablePath: exe, args: ["--no-sandbox", "--disable-gpu"] });
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(base + "/", { waitUntil: "load" });
  await page.waitForFunction(() => document.getElementById("status").textContent === "ready", null, { timeout: 20000 });
  ok("page loaded, status ready, model " + (await page.textContent("#model")));
  const nodes = await page.locator("#nodes .node").count();
  const stages = await page.locator("#placement > div").count();
  const devText = await page.textContent("#nodes .dev");
  if (nodes < 1 || stages < 1 || !/CPU/.test(devText)) fail(`topology: ${nodes} nodes, ${stages} stages, "${devText}"`);
  else ok(`topology: ${nodes} node(s) with devices and memory bars, placement in ${stages} stage(s): ${await page.textContent("#placement")}`);

  await page.fill("#max-tokens", "200");
  await page.fill("#chat-input", "Hello strata, please stream a few tokens.");
  // every text the assistant message shows, recorded in the page as the DOM changes (polling
  // from here missed the whole stream when CI's load slowed the round trips past its 0.6 s)
  await page.evaluate(() => {
    window.__partials = new Set();
    new MutationObserver(() => {
      const t = document.querySelector(".msg.assistant .text");
      if (t && t.textContent) window.__partials.add(t.textContent);
    }).observe(document.body, { subtree: true, childList: true, characterData: true });
  });
  await page.click("#chat-send");
  // record the assistant text as it grows
  const seen = new Set();
  const t0 = Date.now();
  let shotTaken = "";
  for (;;) {
    const st = await page.evaluate(() => {
      const d = document.querySelector(".msg.assistant");
      return d ? { text: d.querySelector(".text").textContent, done: d.dataset.done || "" } : null;
    });
    if (st) {
      if (st.text) seen.add(st.text);
      // mid-stream (after a /metrics poll saw tokens flowing): the screenshot shows live figures
      if (!shotTaken && Date.now() - t0 > 2500 && !st.done) {
        await page.screenshot({ path: shot, fullPage: true });
        shotTaken = `mid-stream at ${Date.now() - t0} ms: tokens/s ${await page.textContent("#tps")}, KV ${await page.textContent("#kv-text")}, slots ${await page.textContent("#slots")}`;
      }
      if (st.done) {
        if (st.done !== "1") fail("chat ended with an error: " + st.text);
        break;
      }
    }
    if (Date.now() - t0 > 60000) { fail("the answer did not finish in 60 s"); break; }
    await new Promise((r) => setTimeout(r, 15));
  }
  const partials = await page.evaluate(() => window.__partials.size);
  if (partials < 3) fail(`the answer did not stream: only ${partials} distinct partial texts (${seen.size} seen by polling)`);
  else ok(`chat streamed: ${partials} distinct partial texts before the end (${seen.size} seen by polling)`);
  const meta = await page.textContent(".msg.assistant .meta");
  ok("answer meta: " + meta);
  // the live panel picks up the tokens on its next /metrics poll
  await page.waitForFunction(() => parseFloat(document.getElementById("reqs").textContent) > 0, null, { timeout: 5000 });
  await page.waitForTimeout(1200);
  ok(`live panel: ${await page.textContent("#tps")} tok/s, TTFT ${await page.textContent("#ttft")}, inter-token ${await page.textContent("#itl")}, KV ${await page.textContent("#kv-text")}, slots ${await page.textContent("#slots")}`);
  if (!shotTaken) await page.screenshot({ path: shot, fullPage: true });
  ok("screenshot " + shot + (shotTaken ? " taken " + shotTaken : " taken at the end"));
  if (errors.length) fail("page errors: " + errors.join("; "));
} finally {
  await browser.close();
}
