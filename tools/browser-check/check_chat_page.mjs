// Headless check of the chat page at `/` of a running server (bitnet serve or mock_serve):
// loads it in Debian's chromium, sends a message, checks that the reply streams in (seen growing
// before it is complete), sends a second message and stops it midway with the Stop button (the
// server must then show no running sequence), and saves a screenshot.
//
//   cd tools/browser-check && npm install
//   node check_chat_page.mjs http://127.0.0.1:8080 [screenshot.png]
//
// Environment: BITNET_API_KEY (typed into the page's key field), CHROMIUM (default
// /usr/bin/chromium). The screenshot defaults to docs/images/chat-page.png. Exits non-zero on any
// failed check. The mock server streams slowly enough to watch with `--token-delay-ms 60`.

import { chromium } from "playwright-core";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const baseUrl = (process.argv[2] || process.env.BITNET_SERVER_URL || "http://127.0.0.1:8080").replace(/\/$/, "");
const screenshot = resolve(process.argv[3] || join(here, "..", "..", "docs", "images", "chat-page.png"));
const apiKey = process.env.BITNET_API_KEY || "";
// A model that answers faster than the page can be watched (the embedded model in CI): the reply
// may arrive in one piece and finish before Stop is clicked; both are then noted, not failed.
const fastModel = process.env.BROWSER_CHECK_FAST_MODEL === "1";

const host = new URL(baseUrl).hostname;
if (!["127.0.0.1", "localhost", "[::1]", "::1"].includes(host)) {
  console.error(`refusing ${baseUrl}: this check only targets loopback servers`);
  process.exit(2);
}

function check(condition, message) {
  if (!condition) throw new Error("check failed: " + message);
  console.log("ok: " + message);
}

async function runningSequences() {
  const text = await (await fetch(baseUrl + "/metrics")).text();
  const line = text.split("\n").find((l) => l.startsWith("bitnet_running_sequences "));
  return Number(line.split(" ")[1]);
}

const userDataDir = mkdtempSync(join(tmpdir(), "bitnet-chromium-"));
// playwright passes --user-data-dir itself for a persistent context.
const browser = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 900, height: 640 },
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
  ],
});

try {
  const page = browser.pages()[0] || (await browser.newPage());
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  page.on("requestfailed", (r) => {
    // An aborted stream (the Stop button) is expected; nothing else may fail.
    if (!r.url().endsWith("/v1/chat/completions")) pageErrors.push("request failed: " + r.url());
  });
  page.on("request", (r) => {
    if (!r.url().startsWith(baseUrl)) pageErrors.push("the page reached outside its server: " + r.url());
  });

  await page.goto(baseUrl + "/", { waitUntil: "load" });
  check((await page.title()) === "BitNet chat", "the chat page loads");
  if (apiKey) {
    await page.fill("#api-key", apiKey);
    await page.dispatchEvent("#api-key", "change");
  }
  await page.waitForFunction(() => document.getElementById("model").textContent.length > 0, null, { timeout: 10000 });
  check(true, "the header shows the model: " + (await page.textContent("#model")));
  await page.click("details summary");
  await page.fill("#system", "You are a helpful assistant. Answer briefly.");

  // First message: watch the reply grow.
  await page.fill("#input", "Hello! What is a ternary weight?");
  await page.click("#send");
  await page.waitForSelector(".msg.assistant", { timeout: 10000 });
  const seen = new Set();
  const deadline = Date.now() + 120000;
  for (;;) {
    const state = await page.$eval(".msg.assistant", (el) => ({ text: el.textContent, pending: el.classList.contains("pending") }));
    if (state.text) seen.add(state.text);
    if (!state.pending) break;
    if (Date.now() > deadline) throw new Error("the reply did not finish within 120 s");
    await page.waitForTimeout(15);
  }
  const reply = await page.$eval(".msg.assistant", (el) => el.textContent);
  check(!(await page.$(".msg.error")), "the reply is not an error: " + JSON.stringify(reply));
  check(reply.length > 0, "the reply has text: " + JSON.stringify(reply.slice(0, 80)));
  check(seen.size >= 2 || fastModel, `the reply streamed in (${seen.size} partial states seen)`);
  check(await page.isEnabled("#send"), "Send is enabled again after the reply");

  // Second message: stop it once some text has arrived.
  await page.fill("#input", "Tell me more, at length.");
  await page.click("#send");
  await page.waitForFunction(() => {
    const replies = document.querySelectorAll(".msg.assistant");
    return replies.length === 2 && replies[1].textContent.length > 0;
  }, null, { timeout: 60000 });
  // Checked and clicked in one step inside the page: a fast model can finish between a separate
  // check and click, and a click on a disabled button would wait for it to be enabled again.
  const stopped = await page.evaluate(() => {
    const stop = document.querySelector("#stop");
    if (stop.disabled) return false;
    stop.click();
    return true;
  });
  await page.waitForFunction(() => !document.querySelector(".msg.pending"), null, { timeout: 10000 });
  const errorText = await page.$eval(".msg.error", (el) => el.textContent).catch(() => null);
  check(errorText === null, (stopped ? "Stop ends the reply without an error" : "the second reply finished before Stop") + (errorText ? ": " + errorText : ""));
  check(stopped || fastModel, "Stop was clickable while the second reply streamed");
  if (stopped) {
    // A fast model can finish between the enabled check and the click; the abort then has
    // nothing to stop and the reply carries no note. Only a slow (watchable) model must show it.
    const note = await page.$(".msg.assistant:last-of-type .note");
    const noteText = note ? await note.textContent() : null;
    if (noteText === null && fastModel) console.log("note: the second reply finished before Stop took effect");
    else check(noteText === "stopped", "the stopped reply says so");
  }
  let running = await runningSequences();
  for (let i = 0; i < 50 && running > 0; i++) {
    await new Promise((r) => setTimeout(r, 100));
    running = await runningSequences();
  }
  check(running === 0, "the server runs no sequence after Stop");
  check((await page.$$(".msg.user")).length === 2, "the conversation keeps both messages");

  check(pageErrors.length === 0, "no page errors " + JSON.stringify(pageErrors));
  mkdirSync(dirname(screenshot), { recursive: true });
  await page.screenshot({ path: screenshot });
  console.log("screenshot: " + screenshot);
} catch (e) {
  // undici's "fetch failed" hides the reason (refused, reset, timed out) in `cause`.
  console.error(e.message + (e.cause ? ": " + (e.cause.code || "") + " " + e.cause.message : ""));
  process.exitCode = 1;
} finally {
  await browser.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
