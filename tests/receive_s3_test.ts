/**
 * `receive --store s3://bucket/prefix` against a real single-node Swift: hosts ship to the
 * receiver over TCP (no cloud credentials on the host side), the receiver keeps their logdirs in
 * its spool and uploads each to `prefix/<host-id>` within the lag, while the session goes on;
 * restores from the store equal restores of the host's own logdir; a store outage is retried and
 * caught up; SIGTERM ends with a last round; a missing bucket is one line, exit 1, nothing listened.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { nextSeqAfterSealed } from "../lib/format/manifest.ts";
import { restoreAt } from "../lib/restore.ts";
import { readStoreManifest } from "../lib/store/store_logdir.ts";
import type { S3Store } from "../lib/store/s3_store.ts";
import type { TimeSpec } from "../lib/time.ts";
import { Random, testSeed } from "./_helpers.ts";
import { timeArg } from "./_past_fixture.ts";
import { type SwiftNode, swiftTest } from "./_s3_harness.ts";
import {
  CliProcess,
  copyLastSeq,
  lastSeqOf,
  makeSource,
  restorePoints,
  type Source,
  startReceive,
  waitUntil,
  writeEntries,
} from "./_ship_harness.ts";
import { assertFilesEqual, runCli, withTempDir } from "./_watch_harness.ts";

const TEST_NAME = "receive --store s3:// against a real Swift node";
const STORE_URL = "s3://sectorlog/fleet";
/** How long the store may take to catch up in these tests: the lag plus slack for a busy machine. */
const CATCH_UP_MS_MAX = 20_000;

swiftTest(TEST_NAME, { bucket: "sectorlog" }, async (t, swift) => {
  await t.step(
    "a missing bucket: one line, exit 1, nothing listened, no spool created",
    () => withTempDir((dir) => missingBucket(swift, dir)),
  );
  await t.step(
    "hosts ship to the receiver; the store keeps up within the lag while sessions go on, " +
      "restores from s3:// equal the host's, an outage is caught up, SIGTERM uploads the rest",
    () => withTempDir((dir) => receiveToStore(swift, dir)),
  );
});

async function missingBucket(swift: SwiftNode, dir: string): Promise<void> {
  const storedir = join(dir, "spool");
  const run = await runCli(
    ["receive", storedir, "--listen", "127.0.0.1:0", "--store", "s3://no-such-bucket/fleet"],
    { env: swift.env },
  );
  const lines = run.stderr.trim().split("\n");
  assert.deepEqual(run.code, 1, run.stderr);
  assert.deepEqual(lines.length, 1, run.stderr);
  assert.match(lines[0], /^sectorlog: Cannot .*bucket no-such-bucket does not exist/);
  assert.throws(() => Deno.statSync(storedir), "no spool directory");
}

/** The seq up to which the store holds `hostId` (0 when it holds nothing yet). */
async function storedLastSeq(store: S3Store, hostId: string): Promise<number> {
  const manifest = await readStoreManifest({ store, prefix: `fleet/${hostId}` });
  return manifest === undefined ? 0 : nextSeqAfterSealed(manifest) - 1;
}

async function waitForStore(store: S3Store, source: Source, what: string): Promise<number> {
  const lastSeq = await lastSeqOf(source.logdir);
  const startedMs = Date.now();
  await waitUntil(
    async () => (await storedLastSeq(store, source.hostId)) === lastSeq,
    `the store to hold ${source.hostId} up to seq ${lastSeq} (${what})`,
    CATCH_UP_MS_MAX,
  );
  return Date.now() - startedMs;
}

function timeOption(at: TimeSpec | undefined): string[] {
  if (at === undefined) return [];
  if (at.kind === "seq") return ["--at", `seq:${at.seq}`];
  if (at.kind === "mark") return ["--at", `mark:${at.name}`];
  if (at.kind === "instant") return ["--at", timeArg(at.timeUs)];
  throw new Error(`no CLI form for ${JSON.stringify(at)}`);
}

/** `restore s3://…/<host> --at T` equals the host's own logdir restored at T, for several T. */
async function assertStoreRestores(swift: SwiftNode, source: Source, dir: string): Promise<void> {
  for (const [index, at] of (await restorePoints(source.logdir)).entries()) {
    const fromStore = join(dir, `store-${source.hostId}-${index}.img`);
    const fromHost = join(dir, `host-${source.hostId}-${index}.img`);
    const run = await runCli(
      ["restore", `${STORE_URL}/${source.hostId}`, fromStore, "--force", ...timeOption(at)],
      { env: swift.env },
    );
    assert.deepEqual(run.code, 0, `restore at ${JSON.stringify(at)}: ${run.stderr}`);
    await restoreAt(source.logdir, fromHost, { at, force: true });
    assertFilesEqual(fromStore, fromHost, `${source.hostId} at ${JSON.stringify(at ?? "latest")}`);
  }
}

function jsonLines(text: string): Record<string, unknown>[] {
  return text.split("\n").filter((line) => line.startsWith("{")).map((line) => JSON.parse(line));
}

async function receiveToStore(swift: SwiftNode, dir: string): Promise<void> {
  const seed = testSeed();
  const random = new Random(seed);
  const storedir = join(dir, "spool");
  const store = swift.store("sectorlog");
  const vm1 = await makeSource(dir, "vm1", random);
  const vm2 = await makeSource(dir, "vm2", random);
  await writeEntries(vm1, random, 40);
  await writeEntries(vm2, random, 30);
  const receive = await startReceive(
    storedir,
    ["--store", STORE_URL, "--max-lag", "1s", "--json", "--verbose"],
    0,
    swift.env,
  );
  const address = `127.0.0.1:${receive.port}`;
  const follow = new CliProcess(["ship", vm1.logdir, address, "--follow"]);
  try {
    // vm2 ships once and disconnects: the receiver seals its copy between sessions.
    const once = await runCli(["ship", vm2.logdir, address]);
    assert.deepEqual(once.code, 0, once.stderr);
    await follow.waitFor(/connected to|lag 0 entries/);

    // vm1 keeps its session while it writes: the receiver holds the copy's lock the whole time,
    // so only its own seals bring the entries into the store.
    for (let burst = 0; burst < 3; burst++) {
      await writeEntries(vm1, random, 25);
      const lastSeq = await lastSeqOf(vm1.logdir);
      await waitUntil(async () => await copyLastSeq(storedir, "vm1") === lastSeq, "vm1's copy");
      const waitedMs = await waitForStore(store, vm1, `burst ${burst}`);
      assert.ok(waitedMs < CATCH_UP_MS_MAX, `[seed ${seed}] ${waitedMs} ms`);
    }
    assert.deepEqual(follow.exited, undefined, "the follow session went on");
    assert.doesNotMatch(receive.process.stderr, /Host vm1 disconnected/);
    await waitForStore(store, vm2, "vm2 after its session");
    await assertStoreRestores(swift, vm1, dir);
    await assertStoreRestores(swift, vm2, dir);

    // A store outage: rounds fail and say so once; the spool keeps everything; then it catches up.
    await swift.stopProxy();
    try {
      await writeEntries(vm1, random, 20);
      await receive.process.waitFor(/upload of host vm1 to s3:\/\/sectorlog\/fleet\/vm1 failed/);
    } finally {
      await swift.startProxy();
    }
    await receive.process.waitFor(/upload of host vm1 caught up/, CATCH_UP_MS_MAX);
    await waitForStore(store, vm1, "after the outage");

    // SIGTERM right after more entries arrive: the last round uploads them before exit.
    await writeEntries(vm1, random, 15);
    const lastSeq = await lastSeqOf(vm1.logdir);
    await waitUntil(async () => await copyLastSeq(storedir, "vm1") === lastSeq, "vm1's copy");
    const status = await receive.process.stop("SIGTERM");
    assert.deepEqual(status.code, 0, receive.process.stderr);
    assert.match(receive.process.stderr, /last upload round/);
    assert.match(receive.process.stderr, /stopped cleanly/);
    assert.deepEqual(await storedLastSeq(store, "vm1"), lastSeq, "the last round uploaded all");
    await assertStoreRestores(swift, vm1, dir);

    // --json: a listening line, rounds with their lag per host, a stopped line.
    const events = jsonLines(receive.process.stdout);
    assert.deepEqual(events[0].event, "listening");
    assert.deepEqual(events[0].store, STORE_URL);
    const rounds = events.filter((event) => event.event === "round");
    assert.ok(rounds.length >= 3, `${rounds.length} rounds`);
    for (const round of rounds) assert.ok(typeof round.lagMs === "number");
    const failed = rounds.find((round) => (round.failed as number) > 0);
    assert.ok(failed !== undefined, "the outage shows as a failed round");
    assert.deepEqual(events.at(-1)!.event, "stopped");
  } finally {
    await follow.close();
    await receive.process.close();
    store.close();
  }
}
