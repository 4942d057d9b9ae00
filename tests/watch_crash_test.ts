/**
 * `sectorlog watch` killed with SIGKILL in the middle of a write storm, and restarted: it recovers
 * (torn tail truncated, unflushed entries re-applied), `verify` is clean, the device equals the
 * journal's latest state, and `--to-flush` still finds the last flush. Also the ways watch refuses
 * to start: a logdir another watch holds (4), no snapshot (2), a device of another size (2).
 */
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import {
  assertFilesEqual,
  BackgroundProcess,
  isoNow,
  makeSparseImage,
  ModelImage,
  qemuImgCompare,
  qemuIo,
  runCli,
  runCliJson,
  runCliOk,
  skipReason,
  snapshot,
  waitFor,
  WatchProcess,
  withTempDir,
} from "./_watch_harness.ts";

const MiB = 1024 * 1024;

/** One entry as `sectorlog log --json` lists it. */
interface LoggedEntry {
  seq: number;
  kind: string;
  offsetBytes: number;
  lengthBytes: number;
}

/** Bytes in the logdir's segment files (sealed and live). */
function segmentBytes(logdir: string): number {
  const dir = join(logdir, "segments");
  let total = 0;
  for (const name of fs.readdirSync(dir)) total += fs.statSync(join(dir, name)).size;
  return total;
}

const CRASH = "watch killed with SIGKILL during fio restarts, recovers and equals restore latest";
Deno.test({
  name: CRASH,
  ignore: skipReason(CRASH, ["fio", "qemu-io", "qemu-img"]) !== undefined,
  fn: () =>
    withTempDir(async (dir) => {
      const sizeBytes = 64 * MiB;
      const device = join(dir, "disk.img");
      const logdir = join(dir, "log");
      const socketPath = join(dir, "nbd.sock");
      await makeSparseImage(device, sizeBytes);
      await snapshot(device, logdir);
      const flushed = join(dir, "model-flushed.img");
      const model = new ModelImage(sizeBytes);
      let killedAt: string;

      const watch = await WatchProcess.start(device, logdir, { socketPath });
      let fio: BackgroundProcess | undefined;
      try {
        await qemuIo(watch.uri, ["write -P 0x5a 0 1M", "write -P 0x5b 63M 1M", "flush"]);
        model.fill(0x5a, 0, MiB);
        model.fill(0x5b, 63 * MiB, MiB);
        await model.save(flushed);
        const bytesBeforeFio = segmentBytes(logdir);
        // Time-based, so fio is still writing (and never flushing) when watch dies.
        fio = new BackgroundProcess("fio", [
          "--name=crash",
          "--ioengine=nbd",
          `--uri=${watch.uri}`,
          "--rw=randwrite",
          "--bs=4k",
          "--iodepth=16",
          "--size=48M",
          "--time_based",
          "--runtime=120",
        ]);
        await waitFor(() => {
          if (fio!.exited !== undefined) throw new Error(`fio exited early:\n${fio!.output}`);
          return segmentBytes(logdir) > bytesBeforeFio + 4 * MiB;
        }, "fio to write 4 MiB through watch");
        await watch.kill();
        killedAt = isoNow();
        // fio fails once its server is gone; that is expected, only its exit is awaited.
        await waitFor(() => fio!.exited !== undefined, "fio to notice watch died", 30_000)
          .catch(() => {});
        await fio.close();
      } finally {
        await fio?.close();
        await watch.close();
      }
      assert.equal(watch.exited?.signal, "SIGKILL");
      // Simulate a power loss that kept the journal but lost the device's page cache: scribble
      // over the range of the last journaled write. Write-ahead replay must put it back.
      const crashed = await runCliJson<{ entries: LoggedEntry[] }>(["log", logdir]);
      const lastWrite = crashed.entries.findLast((e) => e.kind === "write")!;
      const file = await Deno.open(device, { write: true });
      try {
        await file.seek(lastWrite.offsetBytes, Deno.SeekMode.Start);
        await file.write(new Uint8Array(lastWrite.lengthBytes).fill(0xee));
      } finally {
        file.close();
      }

      // The socket file a killed watch leaves behind must not stop the restart.
      const restarted = await WatchProcess.start(device, logdir, { socketPath });
      try {
        const recovered =
          /recovered after a crash: truncated a torn tail of (\d+) bytes, re-applied (\d+) entries/
            .exec(restarted.stderr);
        assert.ok(recovered !== null, `no recovery report on stderr:\n${restarted.stderr}`);
        assert.ok(Number(recovered[2]) > 0, "fio's unflushed writes should be re-applied");
        await restarted.stop();
      } finally {
        await restarted.close();
      }

      const verify = await runCli(["verify", logdir, "--json"]);
      assert.equal(verify.code, 0, `verify after the crash:\n${verify.stdout}${verify.stderr}`);
      assert.equal(JSON.parse(verify.stdout).ok, true);

      const latest = join(dir, "restored-latest.img");
      await runCliOk(["restore", logdir, latest]);
      assertFilesEqual(latest, device, "restore (latest) vs device after kill -9 and restart");

      const toFlush = join(dir, "restored-to-flush.img");
      const result = await runCliJson<{ targetSeq: number }>([
        "restore",
        logdir,
        toFlush,
        "--at",
        killedAt,
        "--to-flush",
      ]);
      await qemuImgCompare(toFlush, flushed, "restore --at <kill time> --to-flush");
      const log = await runCliJson<{ entries: LoggedEntry[] }>(["log", logdir]);
      assert.equal(log.entries.find((e) => e.seq === result.targetSeq)?.kind, "flush");
      assert.ok(
        log.entries.some((e) => e.seq > result.targetSeq && e.kind === "write"),
        "fio's writes come after the flush",
      );
    }),
});

const BUSY = "a second watch on a logdir that a running watch holds exits 4 naming its pid";
Deno.test({
  name: BUSY,
  fn: () =>
    withTempDir(async (dir) => {
      const device = join(dir, "disk.img");
      const logdir = join(dir, "log");
      await makeSparseImage(device, 4 * MiB);
      await snapshot(device, logdir);
      const watch = await WatchProcess.start(device, logdir, { socketPath: join(dir, "a.sock") });
      try {
        const second = await runCli(
          ["watch", device, logdir, "--socket", join(dir, "b.sock")],
          { timeoutMs: 60_000 },
        );
        assert.equal(second.code, 4, `second watch: ${second.stderr}`);
        assert.match(second.stderr, new RegExp(`pid ${watch.pid}\\b`));
        assert.ok(!fs.existsSync(join(dir, "b.sock")), "the refused watch must not listen");
        await watch.stop();
      } finally {
        await watch.close();
      }
    }),
});

const NO_SNAPSHOT = "watch on a logdir without a snapshot exits 2 saying to run snapshot first";
Deno.test({
  name: NO_SNAPSHOT,
  fn: () =>
    withTempDir(async (dir) => {
      const device = join(dir, "disk.img");
      await makeSparseImage(device, 4 * MiB);
      const empty = join(dir, "empty");
      await Deno.mkdir(empty);
      for (const logdir of [empty, join(dir, "missing")]) {
        const result = await runCli(
          ["watch", device, logdir, "--socket", join(dir, "nbd.sock")],
          { timeoutMs: 60_000 },
        );
        assert.equal(result.code, 2, `watch on ${logdir}: ${result.stderr}`);
        assert.ok(result.stderr.includes(logdir), result.stderr);
        assert.match(result.stderr, /sectorlog snapshot/);
        assert.ok(!fs.existsSync(join(dir, "nbd.sock")));
      }
    }),
});

const OTHER_SIZE = "watch on a device of another size than the snapshot's exits 2";
Deno.test({
  name: OTHER_SIZE,
  fn: () =>
    withTempDir(async (dir) => {
      const device = join(dir, "disk.img");
      const logdir = join(dir, "log");
      await makeSparseImage(device, 4 * MiB);
      await snapshot(device, logdir);
      const bigger = join(dir, "bigger.img");
      await makeSparseImage(bigger, 8 * MiB);
      const result = await runCli(
        ["watch", bigger, logdir, "--socket", join(dir, "nbd.sock")],
        { timeoutMs: 60_000 },
      );
      assert.equal(result.code, 2, result.stderr);
      assert.match(result.stderr, new RegExp(`${8 * MiB} bytes`));
      assert.match(result.stderr, new RegExp(`${4 * MiB} bytes`));
      assert.ok(!fs.existsSync(join(dir, "nbd.sock")));
      // The refusal left the logdir usable.
      const verify = await runCli(["verify", logdir]);
      assert.equal(verify.code, 0, verify.stderr);
    }),
});

const SIGTERM_UNDER_LOAD = "watch stopped with SIGTERM during fio exits 0 with device = restore";
Deno.test({
  name: SIGTERM_UNDER_LOAD,
  ignore: skipReason(SIGTERM_UNDER_LOAD, ["fio"]) !== undefined,
  fn: () =>
    withTempDir(async (dir) => {
      const device = join(dir, "disk.img");
      const logdir = join(dir, "log");
      await makeSparseImage(device, 32 * MiB);
      await snapshot(device, logdir);
      const watch = await WatchProcess.start(device, logdir, { socketPath: join(dir, "nbd.sock") });
      let fio: BackgroundProcess | undefined;
      try {
        fio = new BackgroundProcess("fio", [
          "--name=sigterm",
          "--ioengine=nbd",
          `--uri=${watch.uri}`,
          "--rw=randwrite",
          "--bs=64k",
          "--iodepth=16",
          "--size=24M",
          "--time_based",
          "--runtime=120",
        ]);
        await waitFor(() => {
          if (fio!.exited !== undefined) throw new Error(`fio exited early:\n${fio!.output}`);
          return segmentBytes(logdir) > 8 * MiB;
        }, "fio to write 8 MiB through watch");
        // Requests in flight finish, the journal is flushed and sealed, exit code 0.
        const stderr = await watch.stop();
        assert.match(stderr, /stopped cleanly/);
        await waitFor(() => fio!.exited !== undefined, "fio to notice watch stopped", 30_000)
          .catch(() => {});
      } finally {
        await fio?.close();
        await watch.close();
      }
      const verify = await runCli(["verify", logdir]);
      assert.equal(verify.code, 0, verify.stderr);
      assert.doesNotMatch(verify.stderr, /torn tail/, "a clean stop leaves no torn tail");
      const restored = join(dir, "restored.img");
      await runCliOk(["restore", logdir, restored]);
      assertFilesEqual(restored, device, "restore (latest) vs device after SIGTERM under load");
      // Stopped cleanly: the restart has nothing to recover.
      const again = await WatchProcess.start(device, logdir, { socketPath: join(dir, "nbd.sock") });
      try {
        assert.doesNotMatch(again.stderr, /recovered/);
        await again.stop();
      } finally {
        await again.close();
      }
    }),
});
