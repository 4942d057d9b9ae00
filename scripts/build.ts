/**
 * `deno task build`: the single executable `dist/sectorlog`, which runs without a Deno install or
 * a checkout, with the permissions below and no others.
 *
 * Two ways to make it, chosen automatically (or forced with `--compile` / `--self-extracting`):
 * - `deno compile`, when Deno's runtime for compiled programs (denort) is at hand: named by
 *   `DENORT_BIN`, or already in Deno's cache. `--compile` also lets deno download it.
 * - Otherwise a self-extracting executable, since denort is only served from Deno's download
 *   site, which machines that reach only package registries (like CI here) cannot fetch: a short
 *   sh launcher, then the program bundled by `deno bundle` (npm packages and deno.json inside),
 *   then the gzipped deno binary running this build. The first run unpacks both into a cache
 *   directory (checking their sha256); every run `exec`s that deno on the bundle, so signals,
 *   the pid and the exit code are the program's own.
 *
 * @module
 */
import { dirname, join } from "node:path";
import denoJson from "../deno.json" with { type: "json" };

/** The repository root. */
const REPO_DIR = new URL("..", import.meta.url).pathname;
/** Where the executable is written unless `--output PATH` says otherwise. */
export const BINARY_PATH: string = join(REPO_DIR, "dist", "sectorlog");

/**
 * What sectorlog may do, narrower than `-A`: read and write devices, images, logdirs and keys
 * anywhere; listen and connect (NBD, ship, receive); environment (SECTORLOG_* and what npm
 * packages look at); FFI for lseek(SEEK_DATA) in lib/data_extents.ts; the hostname (a logdir's
 * default host id, a lease's holder) and the OS name and release (the AWS SDK's user agent, for
 * s3:// logdirs). It spawns no processes, so no `--allow-run`.
 */
export const PERMISSIONS: readonly string[] = [
  "--allow-read",
  "--allow-write",
  "--allow-net",
  "--allow-env",
  "--allow-ffi",
  "--allow-sys=hostname,osRelease,homedir",
];

const ENTRY_POINT = join(REPO_DIR, "cli", "main.ts");

async function runDeno(args: string[]): Promise<{ ok: boolean; stderr: string }> {
  const output = await new Deno.Command(Deno.execPath(), {
    args,
    cwd: REPO_DIR,
    stdout: "inherit",
    stderr: "piped",
  }).output();
  return { ok: output.success, stderr: new TextDecoder().decode(output.stderr) };
}

/** Why `deno compile` cannot be used without downloading, or undefined when it can. */
async function denortMissingReason(): Promise<string | undefined> {
  if (Deno.env.get("DENORT_BIN")) return undefined;
  const info = await new Deno.Command(Deno.execPath(), { args: ["info", "--json"] }).output();
  const denoDir = JSON.parse(new TextDecoder().decode(info.stdout)).denoDir as string;
  const zip = join(
    denoDir,
    "dl",
    "release",
    `v${Deno.version.deno}`,
    `denort-${Deno.build.target}.zip`,
  );
  try {
    await Deno.stat(zip);
    return undefined;
  } catch {
    return `deno compile needs denort, which is neither named by DENORT_BIN nor cached at ${zip}`;
  }
}

async function buildCompiled(output: string): Promise<void> {
  const result = await runDeno([
    "compile",
    "--quiet",
    "--no-check",
    ...PERMISSIONS,
    "--output",
    output,
    ENTRY_POINT,
  ]);
  if (!result.ok) throw new Error(`deno compile failed:\n${result.stderr}`);
}

async function sha256Hex(path: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", await Deno.readFile(path));
  return [...new Uint8Array(digest)].map((byte) => byte.toString(16).padStart(2, "0")).join("");
}

async function gzipFile(source: string, target: string): Promise<void> {
  const input = await Deno.open(source);
  const output = await Deno.open(target, { write: true, create: true, truncate: true });
  await input.readable.pipeThrough(new CompressionStream("gzip")).pipeTo(output.writable);
}

/** What the launcher needs to find, check and run its two payloads. */
interface LauncherLayout {
  appOffset: number;
  appBytes: number;
  appSha: string;
  denoOffset: number;
  denoBytes: number;
  denoSha: string;
}

function launcher(layout: LauncherLayout): string {
  const exec = ["run", "--quiet", "--no-config", "--no-lock", "--no-remote", "--no-npm"]
    .concat(PERMISSIONS).join(" ");
  // Offsets are 1-based for `tail -c +N`.
  return `#!/bin/sh
# sectorlog ${denoJson.version}: a self-extracting executable made by \`deno task build\`
# (scripts/build.ts). After this launcher come the bundled program (sha256 ${layout.appSha})
# and a gzipped deno ${Deno.version.deno} (sha256 ${layout.denoSha}). The first run unpacks them
# into $SECTORLOG_CACHE_DIR (default: /var/cache/sectorlog for root, else
# \${XDG_CACHE_HOME:-~/.cache}/sectorlog); every run then execs deno on the program.
set -eu
self=$0
case $self in */*) ;; *) self=$(command -v -- "$self") ;; esac
if [ -n "\${SECTORLOG_CACHE_DIR:-}" ]; then cache=$SECTORLOG_CACHE_DIR
elif [ "$(id -u)" = 0 ]; then cache=/var/cache/sectorlog
elif [ -n "\${XDG_CACHE_HOME:-}" ]; then cache=$XDG_CACHE_HOME/sectorlog
elif [ -n "\${HOME:-}" ]; then cache=$HOME/.cache/sectorlog
else cache=\${TMPDIR:-/tmp}/sectorlog-$(id -u)
fi
runtime=$cache/deno-${layout.denoSha.slice(0, 16)}
app=$cache/sectorlog-${layout.appSha.slice(0, 16)}.js
unpack() { # offset bytes sha256 target gunzip?
  [ -f "$4" ] && return 0
  if [ ! -d "$cache" ]; then mkdir -p -m 700 "$cache"; fi
  if [ ! -O "$cache" ] && [ "$(id -u)" != 0 ]; then
    echo "sectorlog: cannot unpack into $cache: the directory belongs to another user" >&2
    exit 1
  fi
  tmp=$4.tmp.$$
  if [ "$5" = gunzip ]; then
    tail -c +"$1" "$self" | head -c "$2" | gzip -dc >"$tmp" || true
  else
    tail -c +"$1" "$self" | head -c "$2" >"$tmp" || true
  fi
  if ! echo "$3  $tmp" | sha256sum -c --status 2>/dev/null; then
    rm -f "$tmp"
    echo "sectorlog: cannot unpack $self into $cache: damaged or truncated (sha256 mismatch)" >&2
    exit 1
  fi
  chmod 755 "$tmp"
  mv -f "$tmp" "$4"
}
unpack ${layout.appOffset} ${layout.appBytes} ${layout.appSha} "$app" no
unpack ${layout.denoOffset} ${layout.denoBytes} ${layout.denoSha} "$runtime" gunzip
export DENO_DIR="$cache/deno-dir" DENO_NO_UPDATE_CHECK=1 DENO_NO_PROMPT=1
exec "$runtime" ${exec} "$app" "$@"
`;
}

async function buildSelfExtracting(output: string): Promise<void> {
  const work = await Deno.makeTempDir({ prefix: "sectorlog-build-" });
  try {
    const app = join(work, "sectorlog.js");
    const bundle = await runDeno([
      "bundle",
      "--quiet",
      "--platform",
      "deno",
      "--output",
      app,
      ENTRY_POINT,
    ]);
    if (!bundle.ok) throw new Error(`deno bundle failed:\n${bundle.stderr}`);
    const denoGz = join(work, "deno.gz");
    const [appSha, denoSha] = await Promise.all([
      sha256Hex(app),
      sha256Hex(Deno.execPath()),
      gzipFile(Deno.execPath(), denoGz),
    ]);
    const appBytes = (await Deno.stat(app)).size;
    const denoBytes = (await Deno.stat(denoGz)).size;
    // The header's length depends on the offsets it holds: repeat until it stops changing.
    let header = "";
    let headerBytes = 0;
    for (let round = 0; round < 5; round++) {
      header = launcher({
        appOffset: headerBytes + 1,
        appBytes,
        appSha,
        denoOffset: headerBytes + appBytes + 1,
        denoBytes,
        denoSha,
      });
      const length = new TextEncoder().encode(header).length;
      if (length === headerBytes) break;
      headerBytes = length;
    }
    const temp = `${output}.tmp`;
    const out = await Deno.open(temp, { write: true, create: true, truncate: true, mode: 0o755 });
    try {
      await out.write(new TextEncoder().encode(header));
      for (const part of [app, denoGz]) {
        const input = await Deno.open(part);
        await input.readable.pipeTo(out.writable, { preventClose: true });
      }
    } finally {
      out.close();
    }
    await Deno.chmod(temp, 0o755);
    await Deno.rename(temp, output);
  } finally {
    await Deno.remove(work, { recursive: true });
  }
}

if (import.meta.main) {
  const started = performance.now();
  const outputIndex = Deno.args.indexOf("--output");
  const output = outputIndex < 0 ? BINARY_PATH : Deno.args[outputIndex + 1];
  await Deno.mkdir(dirname(output), { recursive: true });
  const force = Deno.args.find((arg) => arg === "--compile" || arg === "--self-extracting");
  const missing = force === undefined ? await denortMissingReason() : undefined;
  let how: string;
  if (force === "--compile" || (force === undefined && missing === undefined)) {
    await buildCompiled(output);
    how = "deno compile";
  } else {
    if (missing !== undefined) console.error(`${missing}: making a self-extracting executable`);
    await buildSelfExtracting(output);
    how = `self-extracting: launcher, deno bundle, deno ${Deno.version.deno}`;
  }
  const sizeBytes = (await Deno.stat(output)).size;
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  console.error(
    `built ${output} (${(sizeBytes / 2 ** 20).toFixed(1)} MiB, ${how}) in ${seconds} s`,
  );
}
