/**
 * `sectorlog serve` of a real filesystem: ext4 made and written through `watch` (nbdfuse + loop,
 * as in watch_ext4_test.ts), then served at a time between two file writes and mounted
 * read-only through nbdfuse + `losetup -r` + `mount -o ro,noload`: the earlier file is there,
 * the later one is not; served at the latest time, both are.
 *
 * The time is taken while ext4 is frozen (fsfreeze), so the state at the flush that freezing
 * ends with is clean and mounts without a journal replay.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { attachLoop, attachNbdfuse, mount, randomBytes, sha256Hex } from "./_fs_harness.ts";
import { ServeProcess } from "./_past_fixture.ts";
import {
  makeSparseImage,
  runOk,
  skipReason,
  snapshot,
  Teardown,
  timeBetweenPhases,
  WatchProcess,
  withTempDir,
} from "./_watch_harness.ts";

const MiB = 1024 * 1024;
const DEVICE_BYTES = 64 * MiB;
const TOOLS = ["nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "mount", "umount", "fsfreeze"];

/**
 * nbdfuse of `socketPath` on `fuseDir` (read-only when asked), waiting for its file of
 * `DEVICE_BYTES`; registers the unmount. Returns the file.
 */

/** Serves `logdir` at `at`, mounts it read-only and returns the hashes of files A and B. */
async function readServed(
  dir: string,
  logdir: string,
  args: string[],
): Promise<{ a?: string; b?: string }> {
  const fuseDir = join(dir, "fuse-served");
  const mountDir = join(dir, "mnt-served");
  await Deno.mkdir(fuseDir, { recursive: true });
  await Deno.mkdir(mountDir, { recursive: true });
  const teardown = new Teardown();
  try {
    const serve = await ServeProcess.start(logdir, join(dir, "serve.sock"), args);
    teardown.add("serve", () => serve.close());
    const file = await attachNbdfuse(teardown, fuseDir, serve.socketPath, {
      sizeBytes: DEVICE_BYTES,
      readOnly: true,
    });
    const loop = await attachLoop(teardown, file, true);
    await mount(teardown, loop, mountDir, "ro,noload");
    const hash = async (name: string) => {
      try {
        return await sha256Hex(await Deno.readFile(join(mountDir, name)));
      } catch (error) {
        if (error instanceof Deno.errors.NotFound) return undefined;
        throw error;
      }
    };
    const hashes = { a: await hash("A"), b: await hash("B") };
    await teardown.run(`mount ${mountDir}`);
    await teardown.run(`loop ${loop}`);
    await teardown.run(`nbdfuse ${fuseDir}`);
    await serve.stop();
    await teardown.run("serve");
    return hashes;
  } finally {
    await teardown.runAll();
  }
}

const EXT4 = "serve of ext4 made through watch: at T between two files A is there and B is not";
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
      await makeSparseImage(device, DEVICE_BYTES);
      await snapshot(device, logdir);
      const fileA = randomBytes(3 * MiB + 123);
      const fileB = randomBytes(2 * MiB + 7);
      let timeA: string;

      const teardown = new Teardown();
      try {
        const watch = await WatchProcess.start(device, logdir, {
          socketPath: join(dir, "nbd.sock"),
        });
        teardown.add("watch", () => watch.close());
        const file = await attachNbdfuse(teardown, fuseDir, watch.socketPath, {
          sizeBytes: DEVICE_BYTES,
          readOnly: false,
        });
        const loop = await attachLoop(teardown, file, false);
        await runOk("mkfs.ext4", ["-q", loop]);
        await mount(teardown, loop, mountDir);

        await Deno.writeFile(join(mountDir, "A"), fileA);
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

      const early = await readServed(dir, logdir, ["--at", timeA, "--to-flush"]);
      assert.equal(early.a, await sha256Hex(fileA), "file A in the view at T");
      assert.equal(early.b, undefined, "file B must not exist in the view at T");
      const late = await readServed(dir, logdir, ["--at", "now"]);
      assert.equal(late.a, await sha256Hex(fileA), "file A in the latest view");
      assert.equal(late.b, await sha256Hex(fileB), "file B in the latest view");
    }),
});
