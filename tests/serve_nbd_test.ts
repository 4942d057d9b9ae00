/**
 * `sectorlog serve` with real NBD clients: nbdcopy of the export equals `restore --at` of the
 * same time (byte for byte and by `qemu-img compare`), several readers at once, writes refused
 * with EPERM, a compaction under a running serve, bad times refused, SIGTERM stops cleanly.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EPERM,
} from "../lib/nbd/constants.ts";
import { assertBytesEqual, type Random, readAll, withSeed } from "./_helpers.ts";
import { SEGMENTS_DIR } from "../lib/format/logdir.ts";
import { RawNbdClient } from "./_nbd_client.ts";
import { buildHistory, type History, ServeProcess, timeArg } from "./_past_fixture.ts";
import {
  assertFilesEqual,
  qemuImgCompare,
  run,
  runCli,
  runCliOk,
  runOk,
  skipReason,
  withTempDir,
} from "./_watch_harness.ts";

const MiB = 1024 * 1024;

/** Runs `body` on a fresh history in a temp dir; a failure names the seed to replay it. */
function withHistory(body: (dir: string, h: History) => Promise<void>): Promise<void> {
  return withSeed((random) =>
    withTempDir(async (dir) => await body(dir, await history(dir, random)))
  );
}

async function history(dir: string, random: Random): Promise<History> {
  return await buildHistory(dir, random, {
    deviceBytes: 8 * MiB,
    phases: 4,
    opsPerPhase: 10,
    writeBytesMax: 2 * MiB,
    segmentBytesMax: MiB,
    compactThroughPhase: 1,
    alignBytes: 512,
  });
}

async function nbdcopy(uri: string, output: string, args: string[] = []): Promise<void> {
  await Deno.remove(output).catch(() => {});
  await runOk("nbdcopy", [...args, uri, output]);
}

const EQUALS = "serve --at T: nbdcopy of the export equals restore --at T, at several times";
Deno.test({
  name: EQUALS,
  ignore: skipReason(EQUALS, ["nbdcopy", "qemu-img"]) !== undefined,
  fn: () =>
    withHistory(async (dir, h) => {
      for (const index of [1, 2, 4]) {
        const phase = h.phases[index];
        const at = timeArg(phase.timeUs);
        const serve = await ServeProcess.start(h.logdir, join(dir, `serve-${index}.sock`), [
          "--at",
          at,
        ]);
        try {
          const copied = join(dir, `copied-${index}.img`);
          await nbdcopy(serve.uri, copied);
          const restored = join(dir, `restored-${index}.img`);
          await runCliOk(["restore", h.logdir, restored, "--at", at]);
          assertFilesEqual(copied, restored, `serve vs restore at phase ${index}`);
          await qemuImgCompare(copied, restored, `serve vs restore at phase ${index}`);
          assertBytesEqual(readAll(copied), phase.image, `serve vs model at phase ${index}`);
          const output = await serve.stop();
          assert.match(output, /stopped cleanly/);
        } finally {
          await serve.close();
        }
        await assert.rejects(Deno.lstat(serve.socketPath), Deno.errors.NotFound);
      }
    }),
});

const CONCURRENT =
  "serve: concurrent readers (4 nbdcopy, 4 connections each) all read the same image";
Deno.test({
  name: CONCURRENT,
  ignore: skipReason(CONCURRENT, ["nbdcopy"]) !== undefined,
  fn: () =>
    withHistory(async (dir, h) => {
      const phase = h.phases[3];
      const serve = await ServeProcess.start(h.logdir, join(dir, "serve.sock"), [
        "--at",
        timeArg(phase.timeUs),
      ]);
      try {
        const outputs = [0, 1, 2, 3].map((i) => join(dir, `copy-${i}.img`));
        await Promise.all(
          outputs.map((output) => nbdcopy(serve.uri, output, ["--connections=4"])),
        );
        for (const output of outputs) assertBytesEqual(readAll(output), phase.image, output);
        await serve.stop();
      } finally {
        await serve.close();
      }
    }),
});

const REFUSED = "serve: writes, zeroes and trims are refused with EPERM and change nothing";
Deno.test({
  name: REFUSED,
  ignore: skipReason(REFUSED, ["nbdinfo"]) !== undefined,
  fn: () =>
    withHistory(async (dir, h) => {
      const before = await Deno.readFile(join(h.logdir, "manifest.json"));
      const serve = await ServeProcess.start(h.logdir, join(dir, "serve.sock"), ["--at", "now"]);
      try {
        const info = JSON.parse((await runOk("nbdinfo", ["--json", serve.uri])).stdout);
        assert.equal(info.exports[0].is_read_only, true);
        assert.equal(info.exports[0]["export-size"], 8 * MiB);
        const client = await RawNbdClient.connect(serve.socketPath);
        try {
          await client.startHandshake();
          await client.go("");
          await client.sendRequest({
            type: NBD_CMD_WRITE,
            handle: 1n,
            offset: 0,
            length: 4096,
            payload: new Uint8Array(4096).fill(1),
          });
          await client.sendRequest({
            type: NBD_CMD_WRITE_ZEROES,
            handle: 2n,
            offset: 0,
            length: 4096,
          });
          await client.sendRequest({ type: NBD_CMD_TRIM, handle: 3n, offset: 0, length: 4096 });
          for (let i = 0; i < 3; i++) {
            const reply = await client.mustReadReply();
            assert.equal(reply.error, NBD_EPERM, `request ${reply.handle} must get EPERM`);
          }
          await client.sendRead(4n, 0, 4096);
          const read = await client.mustReadReply();
          assert.equal(read.error, 0);
          assertBytesEqual(
            read.data,
            h.phases.at(-1)!.image.subarray(0, 4096),
            "read after refusals",
          );
        } finally {
          client.close();
        }
        await serve.stop();
      } finally {
        await serve.close();
      }
      assertBytesEqual(await Deno.readFile(join(h.logdir, "manifest.json")), before, "manifest");
    }),
});

const COMPACTED =
  "serve: a compaction that removes the files a running serve reads does not disturb it";
Deno.test({
  name: COMPACTED,
  ignore: skipReason(COMPACTED, ["nbdcopy"]) !== undefined,
  fn: () =>
    withHistory(async (dir, h) => {
      const phase = h.phases[2];
      const serve = await ServeProcess.start(h.logdir, join(dir, "serve.sock"), [
        "--at",
        timeArg(phase.timeUs),
      ]);
      try {
        const segments = () => [...Deno.readDirSync(join(h.logdir, SEGMENTS_DIR))].length;
        const before = segments();
        await runCliOk(["compact", h.logdir, "--before", timeArg(h.phases[4].timeUs)]);
        assert.ok(segments() < before, "the compaction removed segments");
        const copied = join(dir, "copied.img");
        await nbdcopy(serve.uri, copied);
        assertBytesEqual(readAll(copied), phase.image, "serve after compaction");
        await serve.stop();
      } finally {
        await serve.close();
      }
    }),
});

Deno.test("serve: a time outside the window exits 2 naming the window; no listen flag exits 2", async () => {
  await withHistory(async (dir, h) => {
    const socket = join(dir, "serve.sock");
    const early = await runCli([
      "serve",
      h.logdir,
      "--at",
      timeArg(h.phases[0].timeUs),
      "--socket",
      socket,
    ]);
    assert.equal(early.code, 2, early.stderr);
    assert.match(early.stderr, /earliest restorable time/);
    assert.match(early.stderr, /restorable window is/);
    const noListen = await runCli(["serve", h.logdir, "--at", "now"]);
    assert.equal(noListen.code, 2, noListen.stderr);
    assert.match(noListen.stderr, /--socket PATH or --listen HOST:PORT/);
    const noAt = await run(Deno.execPath(), [
      "run",
      "-A",
      "cli/main.ts",
      "serve",
      h.logdir,
      "--socket",
      socket,
    ]);
    assert.equal(noAt.code, 2, noAt.stderr);
    assert.match(noAt.stderr, /--at/);
  });
});
