/**
 * Compaction, leases and retired objects of logdirs in object storage, against a real
 * single-node OpenStack Swift with s3api (tests/s3/swift.sh; skipped with the reason without it).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { hostname } from "node:os";
import { leaseKey, readLease, StoreLease } from "../lib/store/lease.ts";
import { RETIRED_DIR, sweepRetired } from "../lib/store/store_gc.ts";
import {
  manifestObjectNames,
  objectKey,
  readStoreManifest,
  type StoreLogdir,
} from "../lib/store/store_logdir.ts";
import { formatTimeUtc } from "../lib/time.ts";
import {
  appendSteps,
  expectedAt,
  makeWorkload,
  restoreBytes,
  type Workload,
} from "./_compact_fixture.ts";
import { assertBytesEqual, Random, readAll, testSeed, withTempDir } from "./_helpers.ts";
import { type SwiftNode, swiftTest } from "./_s3_harness.ts";
import { runCli } from "./_watch_harness.ts";

const TEST_NAME = "compact, leases and retired objects of S3 logdirs against a real Swift node";
const BUCKET = "sectorlog";

swiftTest(TEST_NAME, { bucket: BUCKET }, async (t, swift) => {
  await t.step(
    "compact s3:// folds, retires after a grace period, and every later time restores as before",
    () => withTempDir((dir) => compactKeepsEveryLaterTime(swift, dir)),
  );
  await t.step(
    "a local compaction that folded unshipped entries: ship mirrors the logdir and retires the rest",
    () => withTempDir((dir) => mirrorAfterLocalCompaction(swift, dir)),
  );
  await t.step(
    "objects a killed ship or compaction left are deleted after the grace, unless a ship is running",
    () => withTempDir((dir) => orphansCollected(swift, dir)),
  );
  await t.step(
    "a restore while compact runs on the same prefix completes correctly",
    () => withTempDir((dir) => restoreDuringCompaction(swift, dir)),
  );
  await t.step(
    "leases: a second ship or compact of one prefix is refused; an expired lease is taken over",
    () => withTempDir((dir) => leasesRefuseSecondWriter(swift, dir)),
  );
  await t.step(
    "bad input: --max-bytes on s3://, --grace on a local logdir, a garbage lease, a hostile retire record",
    () => withTempDir((dir) => badInput(swift, dir)),
  );
});

async function shippedWorkload(
  swift: SwiftNode,
  dir: string,
  prefix: string,
  steps: number,
): Promise<{ w: Workload; url: string; random: Random; seed: number }> {
  const seed = testSeed();
  const random = new Random(seed);
  const w = await makeWorkload(dir, random);
  await appendSteps(w, random, steps);
  const url = `s3://${BUCKET}/${prefix}`;
  const ship = await runCli(["ship", w.logdir, url, "--json"], { env: swift.env });
  assert.deepEqual(ship.code, 0, `[seed ${seed}] ${ship.stderr}`);
  return { w, url, random, seed };
}

async function restoreFromStore(
  swift: SwiftNode,
  url: string,
  output: string,
  timeUs: number,
): Promise<{ code: number; stderr: string }> {
  return await runCli(["restore", url, output, "--at", formatTimeUtc(timeUs), "--force"], {
    env: swift.env,
  });
}

/** Every restore at `indices` from the store equals the model and the local logdir's restore. */
async function assertRestores(
  swift: SwiftNode,
  w: Workload,
  url: string,
  dir: string,
  indices: number[],
  what: string,
): Promise<void> {
  for (const index of indices) {
    const timeUs = w.history[index].timeUs;
    const output = join(dir, `restore-${index}.img`);
    const run = await restoreFromStore(swift, url, output, timeUs);
    assert.deepEqual(run.code, 0, `${what}, restore at step ${index}: ${run.stderr}`);
    const bytes = readAll(output);
    assertBytesEqual(bytes, expectedAt(w, timeUs), `${what}: model at step ${index}`);
    assertBytesEqual(
      bytes,
      await restoreBytes(w.logdir, timeUs, Date.now() * 1000),
      `${what}: local restore at step ${index}`,
    );
  }
}

async function dataKeys(store: StoreLogdir): Promise<string[]> {
  const keys: string[] = [];
  for await (const item of store.store.list(objectKey(store, ""))) {
    if (/\/(base|levels|segments)\//.test(item.key)) keys.push(item.key);
  }
  return keys.sort();
}

async function compactKeepsEveryLaterTime(swift: SwiftNode, dir: string): Promise<void> {
  const { w, url, random, seed } = await shippedWorkload(swift, dir, "compact/vm1", 150);
  const target = { store: swift.store(BUCKET), prefix: "compact/vm1" };
  try {
    const keysBefore = await dataKeys(target);
    const cutUs = w.history[80].timeUs;
    const run = await runCli(["compact", url, "--before", formatTimeUtc(cutUs), "--json"], {
      env: swift.env,
    });
    assert.deepEqual(run.code, 0, `[seed ${seed}] ${run.stderr}`);
    const result = JSON.parse(run.stdout);
    assert.deepEqual([result.changed, result.logdir], [true, url]);
    assert.ok(result.foldedEntries > 0);
    assert.ok(result.store.objectsUploaded >= 1, "the level went up");
    assert.ok(result.store.objectsRetired >= 1, "folded segments retired");
    assert.deepEqual(result.store.sweep.objectsDeleted, 0, "the grace period (1h) has not passed");
    const manifest = (await readStoreManifest(target))!;
    assert.deepEqual(manifest.levels.length, 1);
    assert.ok(manifest.horizonUs >= cutUs);
    // A ship with nothing new leaves the compacted store as it is.
    const idle = await runCli(["ship", w.logdir, url, "--json"], { env: swift.env });
    assert.deepEqual(idle.code, 0, idle.stderr);
    const idleResult = JSON.parse(idle.stdout);
    assert.deepEqual([idleResult.mode, idleResult.manifestUploaded], ["current", false]);
    assert.deepEqual(await readStoreManifest(target), manifest, "the compaction stays");
    // Retired objects are still there for readers of the old manifest.
    const keysAfter = await dataKeys(target);
    for (const key of keysBefore) assert.ok(keysAfter.includes(key), `${key} kept for the grace`);

    await assertRestores(swift, w, url, dir, [80, 81, 120, 150], "after compaction");
    const early = await restoreFromStore(swift, url, join(dir, "early.img"), w.history[10].timeUs);
    assert.notDeepEqual(early.code, 0, "a time before the horizon is refused");
    assert.match(early.stderr, /horizon|compacted|earliest/i);
    const verify = await runCli(["verify", url, "--json"], { env: swift.env });
    assert.deepEqual(verify.code, 0, verify.stderr);

    // The next ship appends to the compacted store instead of undoing the compaction.
    await appendSteps(w, random, 40);
    const ship = await runCli(["ship", w.logdir, url, "--json"], { env: swift.env });
    assert.deepEqual(ship.code, 0, ship.stderr);
    const shipped = JSON.parse(ship.stdout);
    assert.deepEqual(shipped.mode, "append");
    const grown = (await readStoreManifest(target))!;
    assert.deepEqual(grown.levels, manifest.levels, "the store's level stays");
    assert.deepEqual(grown.horizonUs, manifest.horizonUs);
    await assertRestores(swift, w, url, dir, [100, 170, w.history.length - 1], "after more ship");

    // A second compaction with --grace 0 deletes what both retired: only named objects remain.
    const cut2 = w.history[160].timeUs;
    const again = await runCli(
      ["compact", url, "--before", formatTimeUtc(cut2), "--grace", "0", "--json"],
      { env: swift.env },
    );
    assert.deepEqual(again.code, 0, again.stderr);
    const second = JSON.parse(again.stdout);
    assert.ok(second.store.sweep.objectsDeleted > 0, again.stdout);
    const final = (await readStoreManifest(target))!;
    const named = [...manifestObjectNames(final)].map((name) => objectKey(target, name)).sort();
    assert.deepEqual(await dataKeys(target), named, "no object left behind, none missing");
    const records = [];
    for await (const item of target.store.list(objectKey(target, `${RETIRED_DIR}/`))) {
      records.push(item.key);
    }
    assert.deepEqual(records, [], "retire records removed with their objects");
    await assertRestores(swift, w, url, dir, [160, 175, w.history.length - 1], "second compact");
  } finally {
    target.store.close();
  }
}

async function mirrorAfterLocalCompaction(swift: SwiftNode, dir: string): Promise<void> {
  const { w, url, random, seed } = await shippedWorkload(swift, dir, "mirror/vm1", 60);
  const target = { store: swift.store(BUCKET), prefix: "mirror/vm1" };
  try {
    const before = (await readStoreManifest(target))!;
    await appendSteps(w, random, 60);
    // Fold past what the store holds: no local segment continues the store's log any more.
    const compact = await runCli([
      "compact",
      w.logdir,
      "--before",
      formatTimeUtc(w.history[100].timeUs),
    ]);
    assert.deepEqual(compact.code, 0, compact.stderr);
    const ship = await runCli(["ship", w.logdir, url, "--json"], { env: swift.env });
    assert.deepEqual(ship.code, 0, `[seed ${seed}] ${ship.stderr}`);
    const shipped = JSON.parse(ship.stdout);
    assert.deepEqual(shipped.mode, "mirror");
    assert.ok(shipped.objectsRetired >= before.segments.length, ship.stdout);
    const after = (await readStoreManifest(target))!;
    assert.deepEqual(after.levels.length, 1);
    await assertRestores(swift, w, url, dir, [100, 110, w.history.length - 1], "mirrored store");
    // The retired objects go with the next store compaction once their grace has passed.
    const sweep = await sweepRetired(target, { graceMs: 0 });
    assert.ok(sweep.objectsDeleted >= before.segments.length, JSON.stringify(sweep));
    const named = [...manifestObjectNames(after)].map((name) => objectKey(target, name)).sort();
    assert.deepEqual(await dataKeys(target), named);
    await assertRestores(swift, w, url, dir, [w.history.length - 1], "after the sweep");
  } finally {
    target.store.close();
  }
}

async function orphansCollected(swift: SwiftNode, dir: string): Promise<void> {
  const { url } = await shippedWorkload(swift, dir, "orphans/vm1", 20);
  const target = { store: swift.store(BUCKET), prefix: "orphans/vm1" };
  try {
    const stray = objectKey(target, "segments/00000000000a0000-00000000000a00ff.seg");
    const foreign = objectKey(target, "segments/README.txt~");
    await target.store.put(stray, new Uint8Array(100));
    await target.store.put(foreign, new TextEncoder().encode("not ours"));
    // A ship holds the lease: what it uploaded may not be named yet, so nothing of it goes.
    const ship = await StoreLease.acquire(target, "ship", { purpose: "ship of a test" });
    try {
      const run = await runCli(["compact", url, "--keep", "0", "--grace", "0", "--json"], {
        env: swift.env,
      });
      assert.deepEqual(run.code, 0, run.stderr);
      assert.deepEqual(JSON.parse(run.stdout).store.sweep.orphansDeleted, 0);
      assert.ok(await target.store.head(stray) !== undefined);
    } finally {
      await ship.release();
    }
    const run = await runCli(["compact", url, "--keep", "0", "--grace", "0", "--json"], {
      env: swift.env,
    });
    assert.deepEqual(run.code, 0, run.stderr);
    assert.deepEqual(JSON.parse(run.stdout).store.sweep.orphansDeleted, 1);
    assert.deepEqual(await target.store.head(stray), undefined);
    assert.ok(await target.store.head(foreign) !== undefined, "a name not of ours is left alone");
    const manifest = (await readStoreManifest(target))!;
    for (const name of manifestObjectNames(manifest)) {
      assert.ok(await target.store.head(objectKey(target, name)) !== undefined, name);
    }
    const verify = await runCli(["verify", url], { env: swift.env });
    assert.deepEqual(verify.code, 0, verify.stderr);
  } finally {
    target.store.close();
  }
}

async function restoreDuringCompaction(swift: SwiftNode, dir: string): Promise<void> {
  const { w, url, seed } = await shippedWorkload(swift, dir, "concurrent/vm1", 200);
  const picks = [120, 160, 199];
  const cuts = [60, 110, 150];
  for (let round = 0; round < picks.length; round++) {
    const timeUs = w.history[picks[round]].timeUs;
    const output = join(dir, `during-${round}.img`);
    const [restore, compact] = await Promise.all([
      restoreFromStore(swift, url, output, timeUs),
      runCli(["compact", url, "--before", formatTimeUtc(w.history[cuts[round]].timeUs)], {
        env: swift.env,
      }),
    ]);
    assert.deepEqual(compact.code, 0, `[seed ${seed}] compact ${round}: ${compact.stderr}`);
    assert.deepEqual(restore.code, 0, `[seed ${seed}] restore ${round}: ${restore.stderr}`);
    assertBytesEqual(readAll(output), expectedAt(w, timeUs), `restore during compaction ${round}`);
  }
}

async function leasesRefuseSecondWriter(swift: SwiftNode, dir: string): Promise<void> {
  const { w, url, random } = await shippedWorkload(swift, dir, "lease/vm1", 30);
  const target = { store: swift.store(BUCKET), prefix: "lease/vm1" };
  try {
    // Swift's s3api has no conditional writes: the lease falls back to write-and-read-back.
    const probe = await target.store.putConditional(
      objectKey(target, "probe"),
      new Uint8Array([1]),
      { ifNoneMatch: "*" },
    );
    assert.deepEqual(probe.outcome, "unsupported");

    const held = await StoreLease.acquire(target, "ship", { purpose: "ship of another host" });
    try {
      await appendSteps(w, random, 10);
      const second = await runCli(["ship", w.logdir, url], { env: swift.env });
      assert.deepEqual(second.code, 4, second.stderr);
      assert.match(second.stderr, /leases\/ship\.json is held by ship of another host \(pid/);
      assert.deepEqual(second.stderr.trim().split("\n").length <= 2, true, second.stderr);
      const notShipped = (await readStoreManifest(target))!;
      const other = await StoreLease.acquire(target, "ship", { purpose: "x" }).catch((e) => e);
      assert.ok(other instanceof Error && other.name === "BusyError");
      held.assertHeld();
      await held.renew();
      held.assertHeld();
      assert.ok(notShipped.segments.length > 0);
    } finally {
      await held.release();
    }
    assert.deepEqual(await readLease(target, leaseKey(target, "ship")), undefined, "released");
    const ok = await runCli(["ship", w.logdir, url], { env: swift.env });
    assert.deepEqual(ok.code, 0, ok.stderr);

    const compactLease = await StoreLease.acquire(target, "compact", { purpose: "compact" });
    try {
      const busy = await runCli(["compact", url, "--keep", "0"], { env: swift.env });
      assert.deepEqual(busy.code, 4, busy.stderr);
      assert.match(busy.stderr, /leases\/compact\.json is held by compact/);
    } finally {
      await compactLease.release();
    }

    // The owner of this lease died 10 s ago: its lease expired, the next ship takes it over.
    const nowUs = Date.now() * 1000;
    await target.store.put(
      leaseKey(target, "ship"),
      new TextEncoder().encode(JSON.stringify({
        format: "sectorlog-lease",
        owner: "dead-owner",
        purpose: "ship",
        host: hostname(),
        pid: 999_999,
        acquiredUs: nowUs - 60_000_000,
        expiresUs: nowUs - 10_000_000,
      })),
    );
    await appendSteps(w, random, 5);
    const takeover = await runCli(["ship", w.logdir, url, "--json"], { env: swift.env });
    assert.deepEqual(takeover.code, 0, takeover.stderr);
    assert.deepEqual(JSON.parse(takeover.stdout).mode, "append");
    assert.deepEqual(await readLease(target, leaseKey(target, "ship")), undefined);
  } finally {
    target.store.close();
  }
}

async function badInput(swift: SwiftNode, dir: string): Promise<void> {
  const { w, url } = await shippedWorkload(swift, dir, "bad/vm1", 20);
  const target = { store: swift.store(BUCKET), prefix: "bad/vm1" };
  try {
    const maxBytes = await runCli(["compact", url, "--keep", "0", "--max-bytes", "1G"], {
      env: swift.env,
    });
    assert.deepEqual(maxBytes.code, 2, maxBytes.stderr);
    assert.match(maxBytes.stderr, /--max-bytes/);
    const grace = await runCli(["compact", w.logdir, "--keep", "0", "--grace", "1h"]);
    assert.deepEqual(grace.code, 2, grace.stderr);
    assert.match(grace.stderr, /--grace/);
    const badGrace = await runCli(["compact", url, "--keep", "0", "--grace", "soon"], {
      env: swift.env,
    });
    assert.deepEqual(badGrace.code, 2, badGrace.stderr);

    await target.store.put(leaseKey(target, "ship"), new TextEncoder().encode("garbage\x00\xff"));
    const garbage = await runCli(["ship", w.logdir, url], { env: swift.env });
    assert.deepEqual(garbage.code, 3, garbage.stderr);
    assert.match(garbage.stderr, /lease .*leases\/ship\.json/);
    await target.store.delete(leaseKey(target, "ship"));

    // A retire record that names an object outside its logdir is refused, nothing deleted.
    await target.store.put("elsewhere/precious", new TextEncoder().encode("keep me"));
    await target.store.put(
      objectKey(target, `${RETIRED_DIR}/0000000000000001-00000000.json`),
      new TextEncoder().encode(JSON.stringify({
        format: "sectorlog-retired",
        retiredUs: 1,
        by: "attacker",
        keys: ["elsewhere/precious"],
      })),
    );
    await assert.rejects(sweepRetired(target, { graceMs: 0 }), /Invalid retire record/);
    assert.ok(await target.store.head("elsewhere/precious") !== undefined);
  } finally {
    target.store.close();
  }
}
