/**
 * Filesystem plumbing of the ext4 tests (private to tests/): nbdfuse exposing an NBD export as a
 * file, loop devices, mounts, all undone by a {@linkcode Teardown}.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { BackgroundProcess, run, runOk, sleep, type Teardown, waitFor } from "./_watch_harness.ts";

/** SHA-256 of `bytes` as hex. */
export async function sha256Hex(bytes: Uint8Array<ArrayBuffer>): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", bytes);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** `length` random bytes. */
export function randomBytes(length: number): Uint8Array<ArrayBuffer> {
  const bytes = new Uint8Array(length);
  for (let i = 0; i < length; i += 65536) crypto.getRandomValues(bytes.subarray(i, i + 65536));
  return bytes;
}

/** Unmounts `path`, retrying while it is busy, lazily as a last resort. */
export async function unmount(path: string): Promise<void> {
  for (let attempt = 0; attempt < 20; attempt++) {
    const result = await run("umount", [path]);
    if (result.code === 0) return;
    if (!/busy/i.test(result.stderr)) throw new Error(`umount ${path}: ${result.stderr}`);
    await sleep(100);
  }
  await runOk("umount", ["-l", path]);
  throw new Error(`umount ${path} stayed busy; unmounted lazily`);
}

/**
 * Runs nbdfuse on `fuseDir` for the NBD unix socket, waits until its file `nbd` has
 * `sizeBytes`, and registers the unmount. Returns the file.
 */
export async function attachNbdfuse(
  teardown: Teardown,
  fuseDir: string,
  socketPath: string,
  options: { sizeBytes: number; readOnly?: boolean },
): Promise<string> {
  const args = [
    ...(options.readOnly === true ? ["--readonly"] : []),
    fuseDir,
    "--unix",
    socketPath,
  ];
  const nbdfuse = new BackgroundProcess("nbdfuse", args);
  teardown.add(`nbdfuse ${fuseDir}`, async () => {
    // Unmounting makes nbdfuse disconnect and exit; it is killed only if it does not.
    const unmounted = await run("fusermount3", ["-u", fuseDir]);
    await waitFor(() => nbdfuse.exited !== undefined, "nbdfuse to exit", 10_000).catch(() => {});
    await nbdfuse.close();
    if (unmounted.code !== 0) throw new Error(`fusermount3 -u: ${unmounted.stderr}`);
  });
  const file = join(fuseDir, "nbd");
  await waitFor(async () => {
    if (nbdfuse.exited !== undefined) {
      throw new Error(`nbdfuse exited ${nbdfuse.exited.code}: ${nbdfuse.output}`);
    }
    try {
      return (await Deno.stat(file)).size === options.sizeBytes;
    } catch {
      return false;
    }
  }, `nbdfuse to expose ${file}`);
  return file;
}

/** Attaches `file` to a free loop device and registers its detach. */
export async function attachLoop(
  teardown: Teardown,
  file: string,
  readOnly = false,
): Promise<string> {
  const args = ["--find", "--show", ...(readOnly ? ["--read-only"] : []), file];
  const loop = (await runOk("losetup", args)).stdout.trim();
  assert.match(loop, /^\/dev\/loop\d+$/);
  teardown.add(`loop ${loop}`, () => runOk("losetup", ["-d", loop]));
  return loop;
}

/** Mounts `source` on `mountDir` and registers the unmount. */
export async function mount(
  teardown: Teardown,
  source: string,
  mountDir: string,
  options?: string,
): Promise<void> {
  await runOk("mount", [...(options === undefined ? [] : ["-o", options]), source, mountDir]);
  teardown.add(`mount ${mountDir}`, () => unmount(mountDir));
}
