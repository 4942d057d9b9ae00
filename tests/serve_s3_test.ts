/**
 * `sectorlog serve s3://bucket/prefix --at T` against a real single-node Swift: the export, read
 * with nbdcopy and nbdinfo, equals `restore --at T` of the local logdir byte for byte; only the
 * objects T needs are fetched; the temporary copy lives while serve runs and is gone after
 * SIGTERM or SIGINT; a missing bucket is one line and exit 1.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { assertBytesEqual, readAll, withSeed } from "./_helpers.ts";
import { buildHistory, type History, ServeProcess, timeArg } from "./_past_fixture.ts";
import { type SwiftNode, swiftTest } from "./_s3_harness.ts";
import {
  assertFilesEqual,
  qemuImgCompare,
  runCli,
  runCliOk,
  runOk,
  skipReason,
  withTempDir,
} from "./_watch_harness.ts";

const MiB = 1024 * 1024;
const TEST_NAME = "serve s3:// against a real Swift node";
const URL = "s3://sectorlog/serve/vm1";

swiftTest(TEST_NAME, {
  bucket: "sectorlog",
  skip: skipReason(TEST_NAME, ["nbdcopy", "nbdinfo", "qemu-img"]),
}, async (t, swift) => {
  await withSeed((random) =>
    withTempDir(async (dir) => {
      const h = await buildHistory(dir, random, {
        deviceBytes: 8 * MiB,
        phases: 4,
        opsPerPhase: 10,
        writeBytesMax: 2 * MiB,
        segmentBytesMax: MiB,
        compactThroughPhase: 1,
        alignBytes: 512,
      });
      await runCliOk(["ship", h.logdir, URL], { env: swift.env });
      await t.step(
        "nbdcopy of serve s3:// --at T equals restore --at T of the local logdir, at several times",
        () => exportsEqualRestores(swift, dir, h),
      );
      await t.step(
        "the temporary copy is removed on SIGINT, and serve exits 0",
        () => sigintRemovesCopy(swift, dir, h),
      );
      await t.step(
        "a missing bucket: one line, exit 1, nothing served",
        () => missingBucket(swift, dir),
      );
    })
  );
});

/** The environment of a serve child: the Swift node's AWS_* and a temp dir we can watch. */
async function serveEnv(swift: SwiftNode, dir: string): Promise<Record<string, string>> {
  const tmp = join(dir, "tmp");
  await Deno.mkdir(tmp, { recursive: true });
  return { ...swift.env, TMPDIR: tmp };
}

function tempEntries(dir: string): string[] {
  return [...Deno.readDirSync(join(dir, "tmp"))].map((entry) => entry.name);
}

async function exportsEqualRestores(swift: SwiftNode, dir: string, h: History): Promise<void> {
  const env = await serveEnv(swift, dir);
  for (const index of [2, 3, 4]) {
    const phase = h.phases[index];
    const at = timeArg(phase.timeUs);
    const socket = join(dir, `serve-s3-${index}.sock`);
    const serve = await ServeProcess.start(URL, socket, ["--at", at, "--json"], env);
    try {
      // The copy lives while serve runs, and holds only the segments up to T.
      assert.deepEqual(tempEntries(dir).length, 1, tempEntries(dir).join(" "));
      const info = JSON.parse(serve.process.output.match(/^\{$[\s\S]*?^\}$/m)![0]);
      assert.deepEqual(info.logdir, URL);
      if (index < 4) assert.ok(info.segmentsFetched < info.segmentsListed, JSON.stringify(info));
      const size = await runOk("nbdinfo", ["--size", serve.uri]);
      assert.deepEqual(Number(size.stdout.trim()), 8 * MiB);
      const copied = join(dir, `copied-${index}.img`);
      await runOk("nbdcopy", [serve.uri, copied]);
      const restored = join(dir, `restored-${index}.img`);
      await runCliOk(["restore", h.logdir, restored, "--at", at]);
      assertFilesEqual(copied, restored, `serve s3:// vs local restore at phase ${index}`);
      await qemuImgCompare(copied, restored, `serve s3:// vs local restore at phase ${index}`);
      assertBytesEqual(readAll(copied), phase.image, `serve s3:// vs model at phase ${index}`);
      const output = await serve.stop();
      assert.match(output, /sectorlog serve: serving s3:\/\/sectorlog\/serve\/vm1 /);
      assert.match(output, /stopped cleanly/);
      assert.deepEqual(tempEntries(dir), [], "the temporary copy is removed after SIGTERM");
    } finally {
      await serve.close();
    }
  }
}

async function sigintRemovesCopy(swift: SwiftNode, dir: string, h: History): Promise<void> {
  const env = await serveEnv(swift, dir);
  const socket = join(dir, "serve-s3-int.sock");
  const serve = await ServeProcess.start(URL, socket, ["--at", "now"], env);
  try {
    assert.deepEqual(tempEntries(dir).length, 1);
    const copied = join(dir, "copied-now.img");
    await runOk("nbdcopy", [serve.uri, copied]);
    assertBytesEqual(readAll(copied), h.phases.at(-1)!.image, "serve s3:// --at now vs model");
    const status = await serve.process.stop("SIGINT");
    assert.deepEqual(status.code, 0, serve.process.output);
    assert.match(serve.process.output, /stopped cleanly/);
    assert.deepEqual(tempEntries(dir), [], "the temporary copy is removed after SIGINT");
  } finally {
    await serve.close();
  }
}

async function missingBucket(swift: SwiftNode, dir: string): Promise<void> {
  const env = await serveEnv(swift, dir);
  const socket = join(dir, "serve-missing.sock");
  const run = await runCli(
    ["serve", "s3://no-such-bucket/vm1", "--at", "now", "--socket", socket],
    { env },
  );
  const lines = run.stderr.trim().split("\n");
  assert.deepEqual(run.code, 1, run.stderr);
  assert.deepEqual(lines.length, 1, run.stderr);
  assert.match(lines[0], /^sectorlog: Cannot .*bucket no-such-bucket does not exist/);
  assert.deepEqual(tempEntries(dir), []);
  assert.throws(() => Deno.statSync(socket));
}
