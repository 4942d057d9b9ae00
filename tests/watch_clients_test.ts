/**
 * `sectorlog watch` with real NBD clients (nbdinfo, qemu-io, nbdcopy, fio) through the real CLI:
 * what they see of the export, and that `restore` gives back exactly what they wrote, at every
 * recorded time, at a mark, at the last flush, and at the latest state.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { RawNbdClient } from "./_nbd_client.ts";
import { NBD_CMD_WRITE, NBD_EPERM } from "../lib/nbd/constants.ts";
import {
  assertFilesEqual,
  entryCount,
  makeSparseImage,
  ModelImage,
  qemuImgCompare,
  qemuIo,
  run,
  runCliJson,
  runCliOk,
  runOk,
  skipReason,
  snapshot,
  timeBetweenPhases,
  WatchProcess,
  which,
  withTempDir,
} from "./_watch_harness.ts";

const MiB = 1024 * 1024;

/** A device image, its logdir with a fresh snapshot, and the socket path watch will use. */
async function prepare(dir: string, sizeBytes: number) {
  const device = join(dir, "disk.img");
  const logdir = join(dir, "log");
  await makeSparseImage(device, sizeBytes);
  await snapshot(device, logdir);
  return { device, logdir, socketPath: join(dir, "nbd.sock") };
}

const NBDINFO = "nbdinfo reports watch's size and flags, and read-only under --read-only";
Deno.test({
  name: NBDINFO,
  ignore: skipReason(NBDINFO, ["nbdinfo", "qemu-io"]) !== undefined,
  fn: () =>
    withTempDir(async (dir) => {
      const { device, logdir, socketPath } = await prepare(dir, 8 * MiB);
      const watch = await WatchProcess.start(device, logdir, { socketPath });
      try {
        const info = JSON.parse((await runOk("nbdinfo", ["--json", watch.uri])).stdout);
        const exported = info.exports[0];
        assert.deepEqual(exported["export-name"], "");
        assert.deepEqual(exported["export-size"], 8 * MiB);
        assert.deepEqual(exported.is_read_only, false);
        for (const flag of ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"]) {
          assert.deepEqual(exported[flag], true, `${flag} should be true`);
        }
        await watch.stop();
      } finally {
        await watch.close();
      }

      const readOnly = await WatchProcess.start(device, logdir, {
        socketPath,
        args: ["--read-only"],
      });
      try {
        assert.match(readOnly.stderr, /read-only/);
        const info = JSON.parse((await runOk("nbdinfo", ["--json", readOnly.uri])).stdout);
        assert.deepEqual(info.exports[0].is_read_only, true);
        assert.deepEqual(info.exports[0]["export-size"], 8 * MiB);
        // qemu refuses to open a read-only export for writing; a raw WRITE gets EPERM.
        const qemu = await run("qemu-io", ["-f", "raw", readOnly.uri, "-c", "write -P 1 0 4k"]);
        assert.notEqual(qemu.code, 0, "qemu-io write to a read-only export should fail");
        const client = await RawNbdClient.connect(socketPath);
        try {
          await client.startHandshake();
          await client.go("");
          await client.sendRequest({
            type: NBD_CMD_WRITE,
            handle: 7n,
            offset: 0,
            payload: new Uint8Array(4096).fill(1),
          });
          const reply = await client.mustReadReply();
          assert.deepEqual(reply.handle, 7n);
          assert.deepEqual(reply.error, NBD_EPERM);
        } finally {
          client.close();
        }
        // Reads still work and see the (all-zero) device.
        await qemuIo(readOnly.uri, ["read -P 0 0 64k"], { readOnly: true });
        await readOnly.stop();
      } finally {
        await readOnly.close();
      }
      assert.deepEqual(await entryCount(logdir), 0, "a read-only watch must journal nothing");
      const bytes = await Deno.readFile(device);
      assert.ok(bytes.every((b) => b === 0), "a read-only watch must not change the device");
    }),
});

/** One phase of qemu-io commands and what it does to the model. */
interface Phase {
  commands: string[];
  apply(model: ModelImage): void;
}

const PHASES: Phase[] = [
  {
    commands: ["write -P 0x11 0 64k", "flush"],
    apply: (m) => m.fill(0x11, 0, 64 * 1024),
  },
  {
    commands: ["write -P 0x22 32k 64k", "write -P 0x33 1M 1M", "flush"],
    apply: (m) => {
      m.fill(0x22, 32 * 1024, 64 * 1024);
      m.fill(0x33, MiB, MiB);
    },
  },
  {
    // Write-zeroes and a discard (trimmed ranges read back as zeroes).
    commands: ["write -z 40k 8k", "discard 1028k 64k", "flush"],
    apply: (m) => {
      m.fill(0, 40 * 1024, 8 * 1024);
      m.fill(0, 1028 * 1024, 64 * 1024);
    },
  },
  {
    commands: ["write -P 0x44 8188k 4k", "write -P 0x55 0 512", "write -P 0x66 3M 3M", "flush"],
    apply: (m) => {
      m.fill(0x44, 8188 * 1024, 4096);
      m.fill(0x55, 0, 512);
      m.fill(0x66, 3 * MiB, 3 * MiB);
    },
  },
];

const QEMU_TIMES = "restore --at each recorded time equals what qemu-io had written by then";
Deno.test({
  name: QEMU_TIMES,
  ignore: skipReason(QEMU_TIMES, ["qemu-io", "qemu-img"]) !== undefined,
  fn: () =>
    withTempDir(async (dir) => {
      const sizeBytes = 8 * MiB;
      const { device, logdir, socketPath } = await prepare(dir, sizeBytes);
      const model = new ModelImage(sizeBytes);
      const checkpoints: { time: string; modelPath: string }[] = [];
      const watch = await WatchProcess.start(device, logdir, { socketPath });
      try {
        const before = join(dir, "model-0.img");
        await model.save(before);
        checkpoints.push({ time: await timeBetweenPhases(), modelPath: before });
        for (const [i, phase] of PHASES.entries()) {
          await qemuIo(watch.uri, phase.commands, { discard: true });
          phase.apply(model);
          const modelPath = join(dir, `model-${i + 1}.img`);
          await model.save(modelPath);
          checkpoints.push({ time: await timeBetweenPhases(), modelPath });
        }
        // Reads through the live export see the latest writes.
        await qemuIo(watch.uri, ["read -P 0x55 0 512", "read -P 0x11 512 31k"], {
          readOnly: true,
        });
        await qemuIo(watch.uri, ["read -P 0 40k 8k", "read -P 0x66 3M 3M"], { readOnly: true });
        await watch.stop();
      } finally {
        await watch.close();
      }
      for (const [i, { time, modelPath }] of checkpoints.entries()) {
        const restored = join(dir, `restored-${i}.img`);
        await runCliOk(["restore", logdir, restored, "--at", time]);
        await qemuImgCompare(restored, modelPath, `restore --at ${time} (after phase ${i})`);
        await Deno.remove(restored);
      }
      // Spot-check one restore with qemu-io's own pattern reader.
      const second = join(dir, "restored-2.img");
      await runCliOk(["restore", logdir, second, "--at", checkpoints[2].time]);
      await qemuIo(second, [
        "read -P 0x11 0 32k",
        "read -P 0x22 32k 64k",
        "read -P 0x33 1M 1M",
        "read -P 0 2M 6M",
      ], { readOnly: true });
      assertFilesEqual(device, join(dir, `model-${PHASES.length}.img`), "device after stop");
    }),
});

const MARK = "mark while watch runs, then restore --at mark:NAME gives the state at the mark";
Deno.test({
  name: MARK,
  ignore: skipReason(MARK, ["qemu-io", "qemu-img"]) !== undefined,
  fn: () =>
    withTempDir(async (dir) => {
      const sizeBytes = 4 * MiB;
      const { device, logdir, socketPath } = await prepare(dir, sizeBytes);
      const model = new ModelImage(sizeBytes);
      const atMark = join(dir, "model-at-mark.img");
      const watch = await WatchProcess.start(device, logdir, { socketPath });
      let mark: { via: string; name: string; seq: number };
      try {
        await qemuIo(watch.uri, ["write -P 0xa1 0 128k", "write -P 0xa2 1M 64k"]);
        model.fill(0xa1, 0, 128 * 1024);
        model.fill(0xa2, MiB, 64 * 1024);
        await model.save(atMark);
        mark = await runCliJson(["mark", logdir, "before-upgrade"]);
        await qemuIo(watch.uri, ["write -P 0xb1 64k 128k", "write -z 1M 4k", "flush"]);
        await watch.stop();
      } finally {
        await watch.close();
      }
      assert.deepEqual(mark.via, "watch", "mark should go through the running watch");
      assert.deepEqual(mark.name, "before-upgrade");
      const log = await runCliJson<{ marks: { name: string; seq: number }[] }>([
        "log",
        logdir,
        "--summary",
      ]);
      assert.deepEqual(log.marks.map((m) => [m.name, m.seq]), [["before-upgrade", mark.seq]]);
      const restored = join(dir, "restored.img");
      await runCliOk(["restore", logdir, restored, "--at", "mark:before-upgrade"]);
      await qemuImgCompare(restored, atMark, "restore --at mark:before-upgrade");
      await qemuIo(restored, ["read -P 0xa1 64k 64k", "read -P 0xa2 1M 4k"], { readOnly: true });
    }),
});

/** A source image with random data, a run of zeroes and a hole, seeded so failures replay. */
function sourceImage(sizeBytes: number, seed: number): Uint8Array {
  const bytes = new Uint8Array(sizeBytes);
  let state = seed >>> 0;
  const next = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = Math.imul(state ^ (state >>> 15), state | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
  const view = new DataView(bytes.buffer);
  // Random data in [0, 3 MiB) and [8 MiB, 9 MiB + 4 KiB); zeroes elsewhere.
  for (let i = 0; i < 3 * MiB; i += 4) view.setUint32(i, next());
  for (let i = 8 * MiB; i < 9 * MiB + 4096; i += 4) view.setUint32(i, next());
  return bytes;
}

const NBDCOPY = "nbdcopy an image in and out; the journal's latest state equals the device";
Deno.test({
  name: NBDCOPY,
  ignore: skipReason(NBDCOPY, ["nbdcopy"]) !== undefined,
  fn: () =>
    withTempDir(async (dir) => {
      const sizeBytes = 16 * MiB;
      const { device, logdir, socketPath } = await prepare(dir, sizeBytes);
      const source = join(dir, "source.img");
      const copiedOut = join(dir, "copied-out.img");
      const seed = Math.floor(Math.random() * 2 ** 31);
      await Deno.writeFile(source, sourceImage(sizeBytes, seed));
      // Punch the zero runs out of the source so nbdcopy sees holes and may send zero requests.
      if (which("fallocate") !== undefined) await runOk("fallocate", ["--dig-holes", source]);
      const watch = await WatchProcess.start(device, logdir, { socketPath });
      try {
        await runOk("nbdcopy", ["--flush", source, watch.uri]);
        await runOk("nbdcopy", [watch.uri, copiedOut]);
        assertFilesEqual(copiedOut, source, `nbdcopy out vs in (seed ${seed})`);
        await watch.stop();
      } finally {
        await watch.close();
      }
      assertFilesEqual(device, source, `device after nbdcopy in (seed ${seed})`);
      const restored = join(dir, "restored.img");
      await runCliOk(["restore", logdir, restored]);
      assertFilesEqual(restored, device, `restore (latest) vs device (seed ${seed})`);
    }),
});

/** Arguments of one fio job through the nbd engine with crc32c verification. */
function fioArgs(uri: string, name: string, blockSize: string, sizeBytes: number): string[] {
  return [
    `--name=${name}`,
    "--ioengine=nbd",
    `--uri=${uri}`,
    "--rw=randwrite",
    `--bs=${blockSize}`,
    "--iodepth=16",
    `--size=${sizeBytes}`,
    "--verify=crc32c",
    "--do_verify=1",
    "--verify_fatal=1",
    `--randseed=${Math.floor(Math.random() * 2 ** 31)}`,
  ];
}

const FIO = "fio randwrite with crc32c verify through watch; restore latest equals the device";
Deno.test({
  name: FIO,
  ignore: skipReason(FIO, ["fio"]) !== undefined,
  fn: () =>
    withTempDir(async (dir) => {
      const sizeBytes = 64 * MiB;
      const { device, logdir, socketPath } = await prepare(dir, sizeBytes);
      const watch = await WatchProcess.start(device, logdir, { socketPath });
      try {
        for (const blockSize of ["4k", "1M"]) {
          const result = await run(
            "fio",
            fioArgs(watch.uri, `randwrite-${blockSize}`, blockSize, 32 * MiB),
          );
          const output = result.stdout + result.stderr;
          assert.deepEqual(result.code, 0, `fio bs=${blockSize} failed:\n${output}`);
          assert.ok(!/verify: bad|verify failed|crc32c: verify/i.test(output), output);
          assert.match(output, /err= 0/);
          const issued = /issued rwts: total=\d+,(\d+)/.exec(output);
          assert.ok(issued !== null && Number(issued[1]) > 0, `fio issued no writes:\n${output}`);
        }
        await watch.stop();
      } finally {
        await watch.close();
      }
      const restored = join(dir, "restored.img");
      await runCliOk(["restore", logdir, restored]);
      assertFilesEqual(restored, device, "restore (latest) vs device after fio");
    }),
});

const TO_FLUSH = "restore --at T --to-flush gives the state at the last flush before T";
Deno.test({
  name: TO_FLUSH,
  ignore: skipReason(TO_FLUSH, ["qemu-io", "qemu-img", "nbdcopy"]) !== undefined,
  fn: () =>
    withTempDir(async (dir) => {
      const sizeBytes = 4 * MiB;
      const { device, logdir, socketPath } = await prepare(dir, sizeBytes);
      const model = new ModelImage(sizeBytes);
      const flushed = join(dir, "model-flushed.img");
      const unflushed = join(dir, "model-unflushed.img");
      const patch = join(dir, "patch.img");
      const watch = await WatchProcess.start(device, logdir, { socketPath });
      let afterUnflushed: string;
      try {
        await qemuIo(watch.uri, ["write -P 0x11 0 64k", "write -P 0x12 2M 64k", "flush"]);
        model.fill(0x11, 0, 64 * 1024);
        model.fill(0x12, 2 * MiB, 64 * 1024);
        await model.save(flushed);
        await timeBetweenPhases();
        // nbdcopy without --flush writes and disconnects without NBD_CMD_FLUSH.
        await Deno.writeFile(patch, new Uint8Array(128 * 1024).fill(0x22));
        await runOk("nbdcopy", [patch, watch.uri]);
        model.fill(0x22, 0, 128 * 1024);
        await model.save(unflushed);
        afterUnflushed = await timeBetweenPhases();
        await watch.stop();
      } finally {
        await watch.close();
      }
      const plain = join(dir, "restored-plain.img");
      await runCliOk(["restore", logdir, plain, "--at", afterUnflushed]);
      await qemuImgCompare(plain, unflushed, "restore --at T (no --to-flush)");
      const toFlush = join(dir, "restored-to-flush.img");
      const result = await runCliJson<{ targetSeq: number }>([
        "restore",
        logdir,
        toFlush,
        "--at",
        afterUnflushed,
        "--to-flush",
      ]);
      await qemuImgCompare(toFlush, flushed, "restore --at T --to-flush");
      // The target is the flush entry itself.
      const log = await runCliJson<{ entries: { seq: number; kind: string }[] }>(["log", logdir]);
      const flushSeqs = log.entries.filter((e) => e.kind === "flush").map((e) => e.seq);
      const target = log.entries.find((e) => e.seq === result.targetSeq);
      assert.deepEqual(target?.kind, "flush");
      assert.ok(flushSeqs.includes(result.targetSeq));
    }),
});
