/**
 * `deno task demo`: a real end-to-end run in a temp dir, with the real CLI and the library.
 * Snapshot an image, write through the log-assisted disk at two moments, restore at both moments
 * and show that each restore matches the disk as it was then (and not the other one).
 */
import { join } from "node:path";
import { crc32c } from "../lib/checksum.ts";
import { LogAssistedDisk } from "../lib/disk.ts";
import { formatTimeUtc, nowUs } from "../lib/time.ts";

const cliPath = new URL("../cli/main.ts", import.meta.url).pathname;
const IMAGE_BYTES = 64 * 1024 * 1024;

function step(text: string): void {
  console.log(`\n\x1b[1m== ${text}\x1b[0m`);
}

async function sectorlog(...args: string[]): Promise<string> {
  console.log(`$ sectorlog ${args.join(" ")}`);
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", cliPath, ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const out = new TextDecoder().decode(output.stdout) + new TextDecoder().decode(output.stderr);
  console.log(out.trimEnd().replace(/^/gm, "  "));
  if (!output.success) throw new Error(`sectorlog ${args[0]} exited ${output.code}`);
  return out;
}

async function checksum(path: string): Promise<string> {
  return crc32c(await Deno.readFile(path)).toString(16).padStart(8, "0");
}

const dir = await Deno.makeTempDir({ prefix: "sectorlog-demo-" });
try {
  const image = join(dir, "disk.img");
  const logdir = join(dir, "log");
  step(`A 64 MiB disk image in ${dir}`);
  const file = await Deno.open(image, { create: true, write: true });
  await file.truncate(IMAGE_BYTES);
  await file.write(new TextEncoder().encode("the original boot sector"));
  file.close();

  step("Base snapshot (sparse: holes stay holes)");
  await sectorlog("snapshot", image, logdir);

  step("Write through the log-assisted disk (every write is journaled with its time)");
  const disk = await LogAssistedDisk.open(image, logdir);
  const block = new Uint8Array(1024 * 1024);
  block.fill(0x11);
  await disk.write(0, block);
  await disk.write(32 * 1024 * 1024, block);
  await disk.flush();
  await new Promise((r) => setTimeout(r, 50));
  const t1 = nowUs();
  console.log(`  wrote 2 MiB of 0x11, flushed; T1 = ${formatTimeUtc(t1)}`);
  await disk.mark("after-first-writes");
  const checksumAtT1 = await checksum(image);
  await new Promise((r) => setTimeout(r, 50));
  block.fill(0x22);
  await disk.write(512 * 1024, block);
  await disk.zero(32 * 1024 * 1024, 4096);
  await disk.trim(0, 4096);
  await disk.flush();
  const t2 = nowUs();
  console.log(`  overwrote 1 MiB with 0x22, zeroed and trimmed 4 KiB; T2 = ${formatTimeUtc(t2)}`);
  await disk.close();
  const checksumAtT2 = await checksum(image);

  step("The journal: window, marks, entries");
  await sectorlog("log", logdir);

  step("Restore at T1 and at T2");
  await sectorlog("restore", logdir, join(dir, "at-t1.img"), "--at", formatTimeUtc(t1));
  await sectorlog("restore", logdir, join(dir, "at-t2.img"), "--at", formatTimeUtc(t2));
  await sectorlog("restore", logdir, join(dir, "at-mark.img"), "--at", "mark:after-first-writes");

  step("Compare checksums (crc32c of the whole image)");
  const rows = [
    ["disk at T1", checksumAtT1],
    ["restore --at T1", await checksum(join(dir, "at-t1.img"))],
    ["restore --at mark:after-first-writes", await checksum(join(dir, "at-mark.img"))],
    ["disk at T2 (now)", checksumAtT2],
    ["restore --at T2", await checksum(join(dir, "at-t2.img"))],
  ];
  for (const [what, sum] of rows) console.log(`  ${what.padEnd(40)} ${sum}`);
  const ok = rows[0][1] === rows[1][1] && rows[1][1] === rows[2][1] &&
    rows[3][1] === rows[4][1] && rows[1][1] !== rows[4][1];
  step("Verify the logdir");
  await sectorlog("verify", logdir);
  console.log(
    ok ? "\ndemo ok: each restore equals the disk as it was at its time" : "\ndemo FAILED",
  );
  if (!ok) Deno.exitCode = 1;
} finally {
  await Deno.remove(dir, { recursive: true });
}
