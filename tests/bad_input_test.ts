import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { LogAssistedDisk } from "../lib/disk.ts";
import { exitCodeFor, UsageError } from "../lib/errors.ts";
import { readManifest, SEGMENTS_DIR } from "../lib/format/logdir.ts";
import { restoreAt } from "../lib/restore.ts";
import { takeSnapshot } from "../lib/snapshot.ts";
import { formatTimeUtc, parseTime, type TimeSpec } from "../lib/time.ts";
import { readTimeline } from "../lib/timeline.ts";
import { verifyLogdir } from "../lib/verify.ts";
import {
  assertBytesEqual,
  assertTreeUnchanged,
  FakeClock,
  makeImage,
  readAll,
  readTree,
  withTempDir,
} from "./_helpers.ts";

const DEVICE_BYTES = 64 * 1024;
const SECOND_US = 1_000_000;

interface Fixture {
  dir: string;
  devicePath: string;
  logdir: string;
  clock: FakeClock;
  horizonUs: number;
  lastSeq: number;
}

/** A logdir with sealed segments, a live segment, a mark and a flush; the device is its latest. */
async function makeFixture(dir: string): Promise<Fixture> {
  const devicePath = join(dir, "disk.img");
  const logdir = join(dir, "log");
  const clock = new FakeClock();
  await makeImage(devicePath, DEVICE_BYTES, (bytes) => bytes.fill(0x42, 0, 8192));
  await takeSnapshot(devicePath, logdir, { clock: clock.fn });
  const disk = await LogAssistedDisk.open(devicePath, logdir, {
    clock: clock.fn,
    segmentBytesMax: 4096,
  });
  try {
    for (let i = 0; i < 10; i++) {
      clock.advance(SECOND_US);
      await disk.write(i * 4096, new Uint8Array(1000).fill(i + 1));
      if (i === 4) await disk.mark("before-upgrade");
    }
    await disk.flush();
  } finally {
    await disk.close();
  }
  const manifest = await readManifest(logdir);
  assert.ok(manifest.segments.length > 0, "the fixture has sealed segments");
  const timeline = await readTimeline(logdir);
  return {
    dir,
    devicePath,
    logdir,
    clock,
    horizonUs: manifest.horizonUs,
    lastSeq: timeline.lastSeq,
  };
}

/**
 * Runs `attempt`, expects a UsageError whose message matches `message` (and hint `hint`), and
 * checks that the logdir and the device did not change.
 */
async function assertRefused(
  fixture: Fixture,
  attempt: () => Promise<unknown>,
  message: RegExp,
  hint?: RegExp,
): Promise<void> {
  const logdirBefore = await readTree(fixture.logdir);
  const deviceBefore = readAll(fixture.devicePath);
  await assert.rejects(attempt, (error: unknown) => {
    assert.ok(error instanceof UsageError, `UsageError, got ${error}`);
    assert.equal(exitCodeFor(error), 2);
    assert.match(error.message, message);
    assert.ok(!error.message.endsWith("."), `no trailing period: ${error.message}`);
    if (hint !== undefined) assert.match(error.hint ?? "", hint);
    return true;
  });
  await assertTreeUnchanged(fixture.logdir, logdirBefore, "the logdir");
  assertBytesEqual(readAll(fixture.devicePath), deviceBefore, "the device");
}

function restoreTo(fixture: Fixture, at: TimeSpec | undefined, output = "out.img") {
  return () =>
    restoreAt(fixture.logdir, join(fixture.dir, output), { at, nowUs: fixture.clock.nowUs });
}

function assertNoOutput(fixture: Fixture): void {
  const outputs = fs.readdirSync(fixture.dir).filter((name) => name.startsWith("out.img"));
  assert.deepEqual(outputs, [], "a refused restore leaves no output or partial file");
}

Deno.test("parseTime() throws UsageError naming an unparseable TIME", () => {
  for (const text of ["next tuesday", "2026-13-01", "seq:-1", "mark:", "@x", ""]) {
    assert.throws(() => parseTime(text), (error: unknown) => {
      assert.ok(error instanceof UsageError, `${JSON.stringify(text)}: UsageError, got ${error}`);
      assert.ok(error.message.startsWith(`Cannot parse time ${JSON.stringify(text)}: `));
      return true;
    });
  }
});

Deno.test("restoreAt() refuses a time before the horizon with the window, changing nothing", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeFixture(dir);
    const at = { kind: "instant" as const, timeUs: fixture.horizonUs - 1 };
    await assertRefused(
      fixture,
      restoreTo(fixture, at),
      new RegExp(
        `^Cannot restore to ${formatTimeUtc(at.timeUs)}: earliest restorable time is ${
          formatTimeUtc(fixture.horizonUs)
        }$`,
      ),
      new RegExp(`^restorable window is ${formatTimeUtc(fixture.horizonUs)} to `),
    );
    assertNoOutput(fixture);
  });
});

Deno.test("restoreAt() refuses a time in the future, changing nothing", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeFixture(dir);
    const at = { kind: "instant" as const, timeUs: fixture.clock.nowUs + 3600 * SECOND_US };
    await assertRefused(
      fixture,
      restoreTo(fixture, at),
      /: it is in the future$/,
      /restorable window is/,
    );
    assertNoOutput(fixture);
  });
});

Deno.test("restoreAt() refuses a seq out of range with the restorable seqs, changing nothing", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeFixture(dir);
    for (const seq of [fixture.lastSeq + 1, Number.MAX_SAFE_INTEGER]) {
      await assertRefused(
        fixture,
        restoreTo(fixture, { kind: "seq", seq }),
        new RegExp(`^Cannot restore to seq:${seq}: restorable seqs are 0 to ${fixture.lastSeq}$`),
      );
    }
    assertNoOutput(fixture);
  });
});

Deno.test("restoreAt() refuses a mark that does not exist and lists the marks, changing nothing", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeFixture(dir);
    await assertRefused(
      fixture,
      restoreTo(fixture, { kind: "mark", name: "after-upgrade" }),
      /^Cannot restore to mark:after-upgrade: no mark of that name$/,
      /^restorable marks: before-upgrade$/,
    );
    assertNoOutput(fixture);
    // The mark that does exist restores.
    await restoreTo(fixture, { kind: "mark", name: "before-upgrade" })();
  });
});

Deno.test("readers and LogAssistedDisk.open() refuse a missing logdir with a hint to snapshot", async () => {
  await withTempDir(async (dir) => {
    const missing = join(dir, "nowhere");
    const empty = join(dir, "empty");
    await Deno.mkdir(empty);
    const devicePath = join(dir, "disk.img");
    await makeImage(devicePath, DEVICE_BYTES);
    for (
      const [logdir, state] of [[missing, "no such directory"], [empty, "it has no manifest.json"]]
    ) {
      const attempts: [string, () => Promise<unknown>][] = [
        ["restoreAt", () => restoreAt(logdir, join(dir, "out.img"))],
        ["verifyLogdir", () => verifyLogdir(logdir)],
        ["readTimeline", () => readTimeline(logdir)],
        ["LogAssistedDisk.open", () => LogAssistedDisk.open(devicePath, logdir)],
      ];
      for (const [what, attempt] of attempts) {
        await assert.rejects(attempt, (error: unknown) => {
          assert.ok(error instanceof UsageError, `${what}: UsageError, got ${error}`);
          assert.equal(error.message, `Cannot open logdir ${logdir}: ${state}`, what);
          assert.equal(error.hint, `run \`sectorlog snapshot <device> ${logdir}\` first`, what);
          return true;
        });
      }
    }
    assert.ok(!fs.existsSync(missing), "nothing created the missing logdir");
    assert.deepEqual(fs.readdirSync(empty), [], "nothing was written into the empty folder");
    assert.ok(!fs.existsSync(join(dir, "out.img")));
  });
});

Deno.test("takeSnapshot() refuses a logdir that has a base unless forced, changing nothing", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeFixture(dir);
    const manifest = await readManifest(fixture.logdir);
    await assertRefused(
      fixture,
      () => takeSnapshot(fixture.devicePath, fixture.logdir, { clock: fixture.clock.fn }),
      new RegExp(
        `^Cannot snapshot into ${fixture.logdir}: it already has a base snapshot taken at ${
          formatTimeUtc(manifest.base.endedUs)
        }$`,
      ),
      /^pass --(force|refresh) /,
    );
  });
});

Deno.test("takeSnapshot() with force replaces the base and drops the history before it", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeFixture(dir);
    const old = await readManifest(fixture.logdir);
    const oldFiles = [old.base.file, ...old.segments.map((s) => `${SEGMENTS_DIR}/${s.file}`)];
    fixture.clock.advance(SECOND_US);
    const result = await takeSnapshot(fixture.devicePath, fixture.logdir, {
      clock: fixture.clock.fn,
      force: true,
    });
    assert.equal(result.replaced, true);
    assert.equal(result.replayFromSeq, fixture.lastSeq + 1);
    const manifest = await readManifest(fixture.logdir);
    assert.equal(manifest.logdirId, old.logdirId, "the logdir keeps its identity");
    assert.equal(manifest.base.file, result.baseFile);
    assert.equal(manifest.base.replayFromSeq, fixture.lastSeq + 1);
    assert.equal(manifest.horizonUs, result.endedUs);
    assert.deepEqual(manifest.segments, []);
    for (const file of oldFiles) {
      assert.ok(!fs.existsSync(join(fixture.logdir, file)), `${file} was removed`);
    }
    assert.ok((await verifyLogdir(fixture.logdir)).ok);

    // History before the new base is gone; the new base restores and the log goes on from it.
    await assert.rejects(
      restoreTo(fixture, { kind: "instant", timeUs: old.horizonUs })(),
      /earliest restorable time is/,
    );
    const latest = join(dir, "latest.img");
    await restoreAt(fixture.logdir, latest, { nowUs: fixture.clock.nowUs });
    assertBytesEqual(readAll(latest), readAll(fixture.devicePath), "restore of the new base");
    const disk = await LogAssistedDisk.open(fixture.devicePath, fixture.logdir, {
      clock: fixture.clock.fn,
    });
    try {
      fixture.clock.advance(SECOND_US);
      await disk.write(100, new Uint8Array(300).fill(0xcd));
      assert.equal(disk.writer!.nextSeq, fixture.lastSeq + 2, "seq continues after the base");
    } finally {
      await disk.close();
    }
    await restoreAt(fixture.logdir, latest, { nowUs: fixture.clock.nowUs, force: true });
    assertBytesEqual(readAll(latest), readAll(fixture.devicePath), "restore after a new write");
  });
});

Deno.test("LogAssistedDisk.open() refuses a device of another size, changing nothing", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeFixture(dir);
    const otherPath = join(dir, "other.img");
    await makeImage(otherPath, DEVICE_BYTES + 512);
    const otherBefore = readAll(otherPath);
    await assertRefused(
      fixture,
      () => LogAssistedDisk.open(otherPath, fixture.logdir),
      new RegExp(
        `^Cannot use device ${otherPath} with logdir ${fixture.logdir}: the device is ${
          DEVICE_BYTES + 512
        } bytes, the logdir was made for ${DEVICE_BYTES} bytes$`,
      ),
      /take a new snapshot/,
    );
    assertBytesEqual(readAll(otherPath), otherBefore, "the other device");
    // The logdir is not left locked by the refused open.
    const disk = await LogAssistedDisk.open(fixture.devicePath, fixture.logdir);
    await disk.close();
  });
});

Deno.test("restoreAt() refuses an existing output without force and leaves it untouched", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeFixture(dir);
    const output = join(dir, "out.img");
    const precious = new TextEncoder().encode("do not overwrite me\n");
    fs.writeFileSync(output, precious);
    await assertRefused(
      fixture,
      restoreTo(fixture, undefined),
      new RegExp(`^Cannot restore to ${output}: it already exists$`),
      /--force/,
    );
    assertBytesEqual(readAll(output), precious, "the existing output");
    assert.deepEqual(fs.readdirSync(dir).filter((name) => name.startsWith("out.img")), [
      "out.img",
    ]);
    await restoreAt(fixture.logdir, output, { nowUs: fixture.clock.nowUs, force: true });
    assertBytesEqual(readAll(output), readAll(fixture.devicePath), "the forced restore");
  });
});

Deno.test("LogAssistedDisk.mark() refuses an invalid name and appends nothing", async () => {
  await withTempDir(async (dir) => {
    const fixture = await makeFixture(dir);
    const before = await readTree(fixture.logdir);
    const disk = await LogAssistedDisk.open(fixture.devicePath, fixture.logdir, {
      clock: fixture.clock.fn,
    });
    try {
      for (const name of ["", "bad\nname", "x".repeat(256)]) {
        await assert.rejects(disk.mark(name), (error: unknown) => {
          assert.ok(error instanceof UsageError, `${JSON.stringify(name)}: UsageError`);
          assert.match(error.message, /^Invalid mark name /);
          return true;
        });
      }
      assert.equal(disk.writer!.nextSeq, fixture.lastSeq + 1);
    } finally {
      await disk.close();
    }
    await assertTreeUnchanged(fixture.logdir, before, "the logdir after refused marks");
  });
});
