/**
 * Logdirs in object storage, against a real single-node OpenStack Swift with s3api (started by
 * tests/s3/swift.sh; skipped with the reason when Swift is not installed).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { restoreAt } from "../lib/restore.ts";
import {
  MANIFEST_OBJECT,
  readStoreManifest,
  segmentObjectName,
  shipToStore,
} from "../lib/store/store_logdir.ts";
import { withLocalCopy } from "../lib/store/store_copy.ts";
import { readManifest } from "../lib/format/logdir.ts";
import { formatTimeUtc } from "../lib/time.ts";
import { readTimeline } from "../lib/timeline.ts";
import {
  appendSteps,
  expectedAt,
  makeWorkload,
  restoreBytes,
  type Workload,
} from "./_compact_fixture.ts";
import {
  assertBytesEqual,
  assertTreeUnchanged,
  Random,
  readAll,
  readTree,
  testSeed,
  withTempDir,
} from "./_helpers.ts";
import { type SwiftNode, swiftTest } from "./_s3_harness.ts";
import { cliCommand, runCli } from "./_watch_harness.ts";
import { startWatch } from "../lib/watch.ts";
import { nextSeqAfterSealed } from "../lib/format/manifest.ts";

const TEST_NAME = "S3 logdirs against a real Swift node";

swiftTest(TEST_NAME, { bucket: "sectorlog" }, runSteps);

async function runSteps(t: Deno.TestContext, swift: SwiftNode): Promise<void> {
  await t.step(
    "S3Store puts, gets ranges, lists, deletes and uploads large files in parts",
    () => storeBasics(swift),
  );
  await t.step(
    "ship to s3:// then restore at several times equals the local logdir's restore",
    () => withTempDir((dir) => shipAndRestore(swift, dir)),
  );
  await t.step(
    "wrong credentials, a missing bucket and an unreachable endpoint: one line, exit 1, nothing local touched",
    () => withTempDir((dir) => failuresLeaveLocalDataAlone(swift, dir)),
  );
  await t.step(
    "ship retries while the Swift proxy is down mid-upload, then completes: nothing lost or duplicated",
    () => withTempDir((dir) => proxyDownMidUpload(swift, dir)),
  );
  await t.step(
    "ship --follow --max-lag keeps the store up with a running watch; SIGTERM stops it with exit 0",
    () => withTempDir((dir) => followKeepsUp(swift, dir)),
  );
  await t.step(
    "ship refuses a prefix that holds another logdir",
    () => withTempDir((dir) => refusesAnotherLogdir(swift, dir)),
  );
}

async function storeBasics(swift: SwiftNode): Promise<void> {
  const store = swift.store("sectorlog", {
    multipartThresholdBytes: 6 * 1024 * 1024,
    partBytes: 5 * 1024 * 1024,
  });
  try {
    await store.check();
    await store.put("basics/small", new TextEncoder().encode("hello object storage"));
    assert.deepEqual(
      new TextDecoder().decode(await store.get("basics/small", { offsetBytes: 6, lengthBytes: 6 })),
      "object",
    );
    assert.deepEqual(await store.head("basics/small"), { key: "basics/small", sizeBytes: 20 });
    assert.deepEqual(await store.head("basics/missing"), undefined);
    assert.deepEqual(await store.get("basics/missing"), undefined);
    await withTempDir(async (dir) => {
      // 11 MiB + 3 bytes: three parts (5, 5, 1 MiB + 3) with the sizes above.
      const big = new Uint8Array(11 * 1024 * 1024 + 3);
      new Random(testSeed()).fill(big.subarray(0, 64 * 1024));
      big.fill(7, 6 * 1024 * 1024, 6 * 1024 * 1024 + 4096);
      await Deno.writeFile(join(dir, "big"), big);
      const progress: number[] = [];
      const stored = await store.putFile("basics/big", join(dir, "big"), {
        onProgress: (done) => progress.push(done),
      });
      assert.deepEqual(stored, big.length);
      assert.deepEqual(progress.length, 3, "three parts");
      assertBytesEqual((await store.get("basics/big"))!, big, "downloaded multipart object");
      // 3 MiB: above the buffered size, below the multipart threshold: one streamed PutObject.
      const medium = big.subarray(0, 3 * 1024 * 1024 + 5);
      await Deno.writeFile(join(dir, "medium"), medium);
      const mediumProgress: number[] = [];
      assert.deepEqual(
        await store.putFile("basics/medium", join(dir, "medium"), {
          onProgress: (done) => mediumProgress.push(done),
        }),
        medium.length,
      );
      assert.deepEqual(mediumProgress, [medium.length]);
      assertBytesEqual(
        (await store.get("basics/medium"))!,
        medium,
        "streamed object",
      );
      await store.delete("basics/medium");
      const range = await store.get("basics/big", {
        offsetBytes: 6 * 1024 * 1024 - 2,
        lengthBytes: 4,
      });
      assert.deepEqual([...range!], [0, 0, 7, 7]);
    });
    const listed = [];
    for await (const item of store.list("basics/")) listed.push(item.key);
    assert.deepEqual(listed, ["basics/big", "basics/small"]);
    await store.delete("basics/small");
    await store.delete("basics/small"); // gone already: no error
    assert.deepEqual(await store.head("basics/small"), undefined);
  } finally {
    store.close();
  }
}

async function shipAndRestore(swift: SwiftNode, dir: string): Promise<void> {
  const seed = testSeed();
  const random = new Random(seed);
  const w = await makeWorkload(dir, random);
  await appendSteps(w, random, 150);
  const url = "s3://sectorlog/hosts/vm1";
  // Every entry so far, most of them in the live (unsealed) segment.
  const localLastSeq = (await readTimeline(w.logdir)).lastSeq;
  const first = await runCli(["ship", w.logdir, url, "--json"], { env: swift.env });
  assert.deepEqual(first.code, 0, `[seed ${seed}] ${first.stderr}`);
  const shipped = JSON.parse(first.stdout);
  const local = await readManifest(w.logdir);
  // The live segment was sealed and shipped: the store holds every entry.
  assert.deepEqual(shipped.sealedVia, "ship");
  assert.deepEqual(shipped.lastSeq, local.segments.at(-1)!.lastSeq);
  assert.deepEqual(shipped.lastSeq, localLastSeq);
  assert.deepEqual(shipped.objectsUploaded, 1 + local.segments.length);

  // Objects are named as docs/FORMAT.md says, and the manifest is the local one.
  const store = swift.store("sectorlog");
  try {
    const keys = [];
    for await (const item of store.list("hosts/vm1/")) keys.push(item.key);
    assert.ok(keys.includes(`hosts/vm1/base/${local.base.file}`), keys.join(" "));
    assert.ok(keys.includes(`hosts/vm1/${segmentObjectName(local.segments[0])}`));
    assert.match(
      keys.find((key) => key.includes("/segments/"))!,
      /\/[0-9a-f]{16}-[0-9a-f]{16}\.seg$/,
    );
    const manifestText = new TextDecoder().decode(
      await store.get(`hosts/vm1/${MANIFEST_OBJECT}`),
    );
    assert.deepEqual(JSON.parse(manifestText).logdirId, local.logdirId);

    // Shipping again uploads nothing; more entries upload only the new segments.
    const again = await runCli(["ship", w.logdir, url, "--json"], { env: swift.env });
    assert.deepEqual(again.code, 0, again.stderr);
    const repeat = JSON.parse(again.stdout);
    assert.deepEqual([repeat.objectsUploaded, repeat.manifestUploaded], [0, false]);
    await appendSteps(w, random, 60);
    const more = await shipToStore(w.logdir, { store, prefix: "hosts/vm1" });
    const grown = await readManifest(w.logdir);
    // The store's log is continued: only the new segments are looked at and uploaded.
    assert.deepEqual([more.mode, more.objectsPresent], ["append", 0]);
    assert.deepEqual(more.objectsUploaded, grown.segments.length - local.segments.length);
    // (Reopening the disk may journal an entry of its own, so the model's step count is not it.)
    assert.deepEqual(more.lastSeq, grown.segments.at(-1)!.lastSeq);

    await restoresMatch(swift, w, url, dir, seed);

    // A restore to an early time fetches only the segments it needs.
    const early = w.history[20].timeUs;
    const fetched = await withLocalCopy(
      { store, prefix: "hosts/vm1" },
      { kind: "untilTime", timeUs: early },
      async (copy) => {
        const output = join(dir, "early.img");
        await restoreAt(copy.logdir, output, { at: { kind: "instant", timeUs: early } });
        assertBytesEqual(readAll(output), expectedAt(w, early), "early restore via library");
        return copy.segmentsFetched;
      },
    );
    assert.ok(fetched < grown.segments.length, `fetched ${fetched} of ${grown.segments.length}`);
  } finally {
    store.close();
  }

  const verify = await runCli(["verify", url, "--json"], { env: swift.env });
  assert.deepEqual(verify.code, 0, verify.stderr);
  const verified = JSON.parse(verify.stdout);
  const lastSeq = (await readManifest(w.logdir)).segments.at(-1)!.lastSeq;
  assert.deepEqual([verified.ok, verified.lastSeq], [true, lastSeq]);

  const log = await runCli(["log", url, "--summary", "--json"], { env: swift.env });
  assert.deepEqual(log.code, 0, log.stderr);
  const localLog = await runCli(["log", w.logdir, "--summary", "--json"]);
  const summary = JSON.parse(log.stdout);
  const localSummary = JSON.parse(localLog.stdout);
  assert.deepEqual(summary.entryCount, localSummary.entryCount);
  assert.deepEqual(summary.marks, localSummary.marks);
  assert.deepEqual(summary.logdir, url);
}

/** `restore s3://… --at T` equals the local logdir's restore and the model, for several T. */
async function restoresMatch(
  swift: SwiftNode,
  w: Workload,
  url: string,
  dir: string,
  seed: number,
): Promise<void> {
  const picks = [0, 1, 37, 90, 150, w.history.length - 1];
  for (const index of picks) {
    const timeUs = w.history[index].timeUs;
    const output = join(dir, `s3-${index}.img`);
    const run = await runCli(["restore", url, output, "--at", formatTimeUtc(timeUs)], {
      env: swift.env,
    });
    assert.deepEqual(run.code, 0, `[seed ${seed}] restore at step ${index}: ${run.stderr}`);
    const fromStore = readAll(output);
    const fromLocal = await restoreBytes(w.logdir, timeUs, Date.now() * 1000);
    assertBytesEqual(fromStore, fromLocal, `[seed ${seed}] step ${index}: s3 vs local`);
    assertBytesEqual(fromStore, expectedAt(w, timeUs), `[seed ${seed}] step ${index}: model`);
  }
  // seq:N and the latest state (no --at) too.
  const bySeq = join(dir, "s3-seq.img");
  const seqRun = await runCli(["restore", url, bySeq, "--at", "seq:42"], { env: swift.env });
  assert.deepEqual(seqRun.code, 0, seqRun.stderr);
  const localSeq = join(dir, "local-seq.img");
  await restoreAt(w.logdir, localSeq, { at: { kind: "seq", seq: 42 } });
  assertBytesEqual(readAll(bySeq), readAll(localSeq), `[seed ${seed}] seq:42: s3 vs local`);
  const latest = join(dir, "s3-latest.img");
  const latestRun = await runCli(["restore", url, latest], { env: swift.env });
  assert.deepEqual(latestRun.code, 0, latestRun.stderr);
  assertBytesEqual(readAll(latest), w.model, `[seed ${seed}] latest`);
}

async function failuresLeaveLocalDataAlone(swift: SwiftNode, dir: string): Promise<void> {
  const random = new Random(testSeed());
  await Deno.mkdir(join(dir, "w"));
  const w = await makeWorkload(join(dir, "w"), random);
  await appendSteps(w, random, 40);
  const before = await readTree(w.logdir);
  const cases: { what: string; env: Record<string, string>; url: string; pattern: RegExp }[] = [
    {
      what: "wrong credentials",
      env: { ...swift.env, AWS_SECRET_ACCESS_KEY: "not-the-secret" },
      url: "s3://sectorlog/fail",
      pattern: /access denied/,
    },
    {
      what: "missing bucket",
      env: swift.env,
      url: "s3://no-such-bucket/fail",
      pattern: /bucket no-such-bucket does not exist/,
    },
    {
      what: "unreachable endpoint",
      env: { ...swift.env, AWS_ENDPOINT_URL_S3: "http://127.0.0.1:9" },
      url: "s3://sectorlog/fail",
      pattern: /cannot reach http:\/\/127\.0\.0\.1:9/,
    },
  ];
  for (const { what, env, url, pattern } of cases) {
    const output = join(dir, "out.img");
    for (
      const args of [
        ["ship", w.logdir, url],
        ["restore", url, output],
        ["verify", url],
        ["log", url],
      ]
    ) {
      const run = await runCli(args, { env });
      const lines = run.stderr.trim().split("\n");
      assert.deepEqual(run.code, 1, `${what}: ${args[0]}: ${run.stderr}`);
      assert.deepEqual(lines.length, 1, `${what}: ${args[0]}: one line: ${run.stderr}`);
      assert.match(lines[0], pattern, `${what}: ${args[0]}`);
      assert.match(lines[0], /^sectorlog: Cannot /);
    }
    await assertTreeUnchanged(w.logdir, before, what);
    assert.deepEqual(await exists(join(dir, "out.img")), false, `${what}: no output file`);
  }
}

async function proxyDownMidUpload(swift: SwiftNode, dir: string): Promise<void> {
  const seed = testSeed();
  const random = new Random(seed);
  const w = await makeWorkload(dir, random);
  await appendSteps(w, random, 200);
  const store = swift.store("sectorlog");
  const retries: string[] = [];
  let outage: Promise<void> | undefined;
  try {
    const result = await shipToStore(w.logdir, { store, prefix: "faults/vm1" }, {
      retryDelaysMs: [500, 1_000, 2_000, 4_000, 8_000],
      onProgress: (doneBytes) => {
        // After the first object is up, take the endpoint away for a while, mid-upload.
        if (outage !== undefined || doneBytes === 0) return;
        // Stopped synchronously, so that the very next request finds the proxy gone.
        swift.stopProxySync();
        outage = new Promise((resolve) => setTimeout(resolve, 2_000)).then(() =>
          swift.startProxy()
        );
      },
      onRetry: ({ error }) => retries.push(error.message),
    });
    await outage;
    assert.ok(retries.length > 0, `[seed ${seed}] no retry happened`);
    assert.match(retries[0], /^Cannot upload s3:\/\/sectorlog\/faults\/vm1\//);
    const manifest = await readManifest(w.logdir);
    assert.deepEqual(result.lastSeq, manifest.segments.at(-1)!.lastSeq);
    assert.deepEqual(result.objectsUploaded, 1 + manifest.segments.length);
    const keys = [];
    for await (const item of store.list("faults/vm1/")) keys.push(item.key);
    assert.deepEqual(keys.length, 2 + manifest.segments.length, keys.join(" "));
    const timeUs = w.history[w.history.length - 1].timeUs;
    const output = join(dir, "after-outage.img");
    await withLocalCopy(
      { store, prefix: "faults/vm1" },
      { kind: "all" },
      (copy) => restoreAt(copy.logdir, output, { at: { kind: "instant", timeUs } }),
    );
    assertBytesEqual(readAll(output), w.model, `[seed ${seed}] restore after the outage`);
  } finally {
    await outage?.catch(() => {});
    store.close();
  }
}

async function refusesAnotherLogdir(swift: SwiftNode, dir: string): Promise<void> {
  const random = new Random(testSeed());
  await Deno.mkdir(join(dir, "a"));
  await Deno.mkdir(join(dir, "b"));
  const a = await makeWorkload(join(dir, "a"), random);
  const b = await makeWorkload(join(dir, "b"), random);
  await appendSteps(a, random, 10);
  const url = "s3://sectorlog/shared-prefix";
  assert.deepEqual((await runCli(["ship", a.logdir, url], { env: swift.env })).code, 0);
  const refused = await runCli(["ship", b.logdir, url], { env: swift.env });
  assert.deepEqual(refused.code, 2, refused.stderr);
  assert.match(refused.stderr, /holds another logdir/);
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch {
    return false;
  }
}

async function followKeepsUp(swift: SwiftNode, dir: string): Promise<void> {
  const seed = testSeed();
  const random = new Random(seed);
  const w = await makeWorkload(dir, random);
  const url = "s3://sectorlog/hosts/follow";
  const target = { store: swift.store("sectorlog"), prefix: "hosts/follow" };
  const watch = await startWatch(w.devicePath, w.logdir, {
    listen: { path: join(dir, "nbd.sock") },
  });
  const [command, args] = cliCommand([
    "ship",
    w.logdir,
    url,
    "--follow",
    "--max-lag",
    "1s",
    "--json",
  ]);
  const child = new Deno.Command(command, {
    args,
    env: swift.env,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let output: Deno.CommandOutput;
  try {
    for (let round = 0; round < 3; round++) {
      for (let i = 0; i < 20; i++) {
        const data = new Uint8Array(random.int(1, 16) * 512);
        random.fill(data);
        await watch.disk.write(random.int(0, 100) * 512, data);
      }
      await watch.disk.flush();
      const lastSeq = watch.disk.writer!.nextSeq - 1;
      // Within a few rounds of --max-lag, the store's manifest covers every entry written so far.
      const deadlineMs = Date.now() + 30_000;
      for (;;) {
        const remote = await readStoreManifest(target);
        if (remote !== undefined && nextSeqAfterSealed(remote) - 1 >= lastSeq) break;
        assert.ok(Date.now() < deadlineMs, `[seed ${seed}] the store never reached seq ${lastSeq}`);
        await new Promise((r) => setTimeout(r, 200));
      }
    }
  } finally {
    child.kill("SIGTERM");
    output = await child.output();
    await watch.stop();
    target.store.close();
  }
  const stderr = new TextDecoder().decode(output.stderr);
  assert.equal(output.code, 0, `[seed ${seed}] ship --follow: ${stderr}`);
  const rounds = new TextDecoder().decode(output.stdout).trim().split("\n").map((l) =>
    JSON.parse(l)
  );
  assert.ok(
    rounds.length >= 3 && rounds.every((r) => r.event === "round"),
    "one JSON line a round",
  );
  const fromStore = join(dir, "from-store.img");
  const restored = await runCli(["restore", url, fromStore], { env: swift.env });
  assert.equal(restored.code, 0, restored.stderr);
  const local = join(dir, "local.img");
  await restoreAt(w.logdir, local);
  assertBytesEqual(
    readAll(fromStore),
    readAll(local),
    "restore from the store vs the local logdir",
  );
}
