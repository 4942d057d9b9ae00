/**
 * A real filesystem on `sectorlog watch`: ext4 on a loop device over nbdfuse's file over the NBD
 * socket. Files written before a recorded time are in `restore --at T --to-flush`, files written
 * after are not, and both restores are clean filesystems (fsck) that mount. A point taken while
 * ext4 is frozen is clean as it is (`mount -o ro,noload`); a point taken just after `sync` is
 * crash-consistent (A appears once the journal is replayed).
 *
 * The kernel here has no nbd module, so nbdfuse + losetup stand in for /dev/nbdN.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  makeSparseImage,
  run,
  runCliOk,
  runOk,
  skipReason,
  snapshot,
  Teardown,
  timeBetweenPhases,
  WatchProcess,
  withTempDir,
} from "./_watch_harness.ts";
import { attachLoop, attachNbdfuse, mount, randomBytes, sha256Hex } from "./_fs_harness.ts";

const MiB = 1024 * 1024;
const TOOLS = [
  "nbdfuse",
  "fusermount3",
  "losetup",
  "mkfs.ext4",
  "fsck.ext4",
  "mount",
  "umount",
  "fsfreeze",
  "sync",
];

/** fsck.ext4 -fn must find nothing to fix. */
async function assertFsckClean(image: string, what: string): Promise<void> {
  const result = await run("fsck.ext4", ["-fn", image]);
  assert.equal(result.code, 0, `${what}: fsck.ext4 -fn exited ${result.code}:\n${result.stdout}`);
}

/**
 * Mounts a restored image and returns what files A and B hold: read-only without journal replay
 * (`ro,noload`, what a clean image needs), or read-write so the kernel replays the journal first
 * (what a crash-consistent image needs).
 */
async function readRestored(
  image: string,
  mountDir: string,
  options: { replayJournal?: boolean } = {},
): Promise<{ a?: string; b?: string }> {
  const replay = options.replayJournal === true;
  const teardown = new Teardown();
  try {
    const loop = await attachLoop(teardown, image, !replay);
    await mount(teardown, loop, mountDir, replay ? undefined : "ro,noload");
    const hash = async (name: string) => {
      try {
        return await sha256Hex(await Deno.readFile(join(mountDir, name)));
      } catch (error) {
        if (error instanceof Deno.errors.NotFound) return undefined;
        throw error;
      }
    };
    return { a: await hash("A"), b: await hash("B") };
  } finally {
    await teardown.runAll();
  }
}

const EXT4 = "ext4 over nbdfuse+loop on watch: restore --at T --to-flush is clean, has A and not B";
Deno.test({
  name: EXT4,
  ignore: skipReason(EXT4, TOOLS, { root: true, devices: ["/dev/fuse"] }) !== undefined,
  fn: () =>
    withTempDir(async (dir) => {
      const device = join(dir, "disk.img");
      const logdir = join(dir, "log");
      const fuseDir = join(dir, "fuse");
      const mountDir = join(dir, "mnt");
      await Deno.mkdir(fuseDir);
      await Deno.mkdir(mountDir);
      await makeSparseImage(device, 64 * MiB);
      await snapshot(device, logdir);
      const fileA = randomBytes(3 * MiB + 123);
      const fileB = randomBytes(2 * MiB + 7);
      const shaA = await sha256Hex(fileA);
      const shaB = await sha256Hex(fileB);
      let timeSynced: string;
      let timeA: string;

      const teardown = new Teardown();
      try {
        const watch = await WatchProcess.start(device, logdir, {
          socketPath: join(dir, "nbd.sock"),
        });
        teardown.add("watch", () => watch.close());

        const nbdFile = await attachNbdfuse(teardown, fuseDir, watch.socketPath, {
          sizeBytes: 64 * MiB,
        });

        const loop = await attachLoop(teardown, nbdFile);
        await runOk("mkfs.ext4", ["-q", loop]);
        await mount(teardown, loop, mountDir);

        await Deno.writeFile(join(mountDir, "A"), fileA);
        await runOk("sync", []);
        // After sync, A is durable but may still live only in the ext4 journal.
        timeSynced = await timeBetweenPhases(300);
        // A frozen ext4 is clean on disk (journal checkpointed, needs_recovery cleared), so the
        // state at the flush that freezing ends with is one fsck -n accepts.
        await runOk("fsfreeze", ["-f", mountDir]);
        teardown.add("freeze", () => runOk("fsfreeze", ["-u", mountDir]));
        timeA = await timeBetweenPhases(300);
        await teardown.run("freeze");

        await Deno.writeFile(join(mountDir, "B"), fileB);
        await runOk("sync", []);
        await teardown.run(`mount ${mountDir}`);
        await teardown.run(`loop ${loop}`);
        await teardown.run(`nbdfuse ${fuseDir}`);
        await watch.stop();
        await teardown.run("watch");
      } finally {
        await teardown.runAll();
      }

      const atA = join(dir, "restored-at-a.img");
      await runCliOk(["restore", logdir, atA, "--at", timeA, "--to-flush"]);
      await assertFsckClean(atA, `restore --at ${timeA} --to-flush`);
      const early = await readRestored(atA, mountDir);
      assert.equal(early.a, shaA, "file A in the restore at T");
      assert.equal(early.b, undefined, "file B must not exist in the restore at T");

      // The state right after sync, not frozen, is crash-consistent: a journal replay (a normal
      // mount) shows A, never B, and leaves a clean filesystem.
      const synced = join(dir, "restored-synced.img");
      await runCliOk(["restore", logdir, synced, "--at", timeSynced, "--to-flush"]);
      const replayed = await readRestored(synced, mountDir, { replayJournal: true });
      assert.equal(replayed.a, shaA, "file A after journal replay of the restore at sync");
      assert.equal(replayed.b, undefined, "file B must not exist in the restore at sync");
      await assertFsckClean(synced, `restore --at ${timeSynced} --to-flush, journal replayed`);

      const latest = join(dir, "restored-latest.img");
      await runCliOk(["restore", logdir, latest]);
      await assertFsckClean(latest, "restore (latest)");
      const late = await readRestored(latest, mountDir);
      assert.equal(late.a, shaA, "file A in the latest restore");
      assert.equal(late.b, shaB, "file B in the latest restore");
    }),
});
