/**
 * Writes `fixtures/logdir/format-v1-basic/`: a small logdir made by this version of sectorlog,
 * committed so that tests catch any change that would stop a later sectorlog from reading it.
 * Run only when the on-disk format version changes on purpose (then add a new case; keep old ones).
 */
import { join } from "node:path";
import { LogAssistedDisk } from "../lib/disk.ts";
import { takeSnapshot } from "../lib/snapshot.ts";

const root = new URL("../fixtures/logdir/format-v1-basic/", import.meta.url).pathname;
const startUs = 1_764_000_000_000_000; // 2025-11-24T16:00:00Z
let nowUs = startUs;
const clock = () => nowUs;

await Deno.remove(root, { recursive: true }).catch(() => {});
await Deno.mkdir(root, { recursive: true });
const device = join(root, "device.img");
const image = new Uint8Array(64 * 1024);
for (let i = 0; i < 4096; i++) image[i] = i % 251;
await Deno.writeFile(device, image);
await takeSnapshot(device, join(root, "logdir"), { clock, hostId: "fixture-host" });
const disk = await LogAssistedDisk.open(device, join(root, "logdir"), {
  clock,
  segmentBytesMax: 8 * 1024,
});
const step = async (action: () => Promise<unknown>) => {
  nowUs += 1_000_000;
  await action();
};
await step(() => disk.write(8192, new Uint8Array(4096).fill(0x11)));
await step(() => disk.write(8192 + 100, new Uint8Array(10).fill(0x22)));
await step(() => disk.flush());
await step(() => disk.mark("before-zero"));
await step(() => disk.zero(0, 2048));
await step(() => disk.trim(16384, 4096));
await step(() => disk.write(65536 - 512, new Uint8Array(512).fill(0x33)));
await step(() => disk.flush());
await disk.close({ seal: true });
await Deno.remove(join(root, "logdir", "lock"));
await Deno.remove(join(root, "logdir", "manifest.lock"));
console.log(`wrote ${root}`);
