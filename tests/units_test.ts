/**
 * examples/systemd and examples/cron: the units pass `systemd-analyze verify`, say what the
 * issue asks of them (restart on failure, clean SIGTERM stop within TimeoutStopSec, daily timers,
 * compaction with --keep), and every `sectorlog` command line in them is valid for the CLI; the
 * cron file parses, and its compact and verify jobs run against a tree of real logdirs.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { commandLineProblems, shellWords, writeCliWrapper } from "./_cli_lines.ts";
import {
  makeSparseImage,
  REPO_DIR,
  run,
  runCliOk,
  skipReason,
  withTempDir,
} from "./_watch_harness.ts";

const SYSTEMD_DIR = join(REPO_DIR, "examples", "systemd");
const CRON_FILE = join(REPO_DIR, "examples", "cron", "sectorlog");
const INSTALLED_BINARY = "/usr/local/bin/sectorlog";
/** An instance name for each template: a device name, or an escaped logdir path. */
const INSTANCES: Record<string, string> = {
  "sectorlog-watch@": "loop3",
  "sectorlog-ship@": "loop3",
  "sectorlog-compact@": "var-lib-sectorlog-loop3",
  "sectorlog-verify@": "var-lib-sectorlog-loop3",
};

type Unit = Map<string, Map<string, string[]>>;

/** Parses a unit file: section → key → values (a key may repeat). */
function parseUnit(text: string): Unit {
  const unit: Unit = new Map();
  let section: Map<string, string[]> | undefined;
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#") || line.startsWith(";")) continue;
    const header = /^\[(.+)\]$/.exec(line);
    if (header !== null) {
      section = new Map();
      unit.set(header[1], section);
      continue;
    }
    const eq = line.indexOf("=");
    assert.ok(section !== undefined && eq > 0, `not a key=value line in a section: ${line}`);
    const key = line.slice(0, eq);
    section.set(key, [...(section.get(key) ?? []), line.slice(eq + 1)]);
  }
  return unit;
}

async function units(): Promise<Map<string, Unit>> {
  const result = new Map<string, Unit>();
  for await (const entry of Deno.readDir(SYSTEMD_DIR)) {
    result.set(entry.name, parseUnit(await Deno.readTextFile(join(SYSTEMD_DIR, entry.name))));
  }
  return result;
}

function value(unit: Unit, section: string, key: string): string | undefined {
  return unit.get(section)?.get(key)?.at(-1);
}

/** ExecStart with specifiers and environment defaults (Environment=) expanded. */
function execStart(fileName: string, unit: Unit): string[] {
  const instance = Object.entries(INSTANCES).find(([prefix]) => fileName.startsWith(prefix))?.[1];
  const env = new Map<string, string>();
  for (const line of unit.get("Service")?.get("Environment") ?? []) {
    for (const [, key, val] of line.matchAll(/(\w+)=(\S*)/g)) env.set(key, val);
  }
  const line = value(unit, "Service", "ExecStart")!
    .replaceAll("%i", instance ?? "")
    .replaceAll("%I", (instance ?? "").replaceAll("-", "/"))
    .replace(/\$\{(\w+)\}|\$(\w+)/g, (_, a, b) => env.get(a ?? b) ?? "");
  return shellWords(line);
}

Deno.test("units: the set the issue asks for, each with what it promises", async () => {
  const all = await units();
  for (
    const name of [
      "sectorlog-watch@.service",
      "sectorlog-receive.service",
      "sectorlog-compact@.service",
      "sectorlog-compact@.timer",
      "sectorlog-verify@.service",
      "sectorlog-verify@.timer",
    ]
  ) {
    assert.ok(all.has(name), `examples/systemd/${name} is missing`);
  }
  for (const name of ["sectorlog-watch@.service", "sectorlog-receive.service"]) {
    const unit = all.get(name)!;
    assert.equal(value(unit, "Service", "Restart"), "on-failure", name);
    assert.equal(value(unit, "Service", "KillSignal") ?? "SIGTERM", "SIGTERM", name);
    assert.match(value(unit, "Service", "TimeoutStopSec") ?? "", /^\d+/, name);
    assert.equal(value(unit, "Install", "WantedBy"), "multi-user.target", name);
  }
  const watch = execStart("sectorlog-watch@.service", all.get("sectorlog-watch@.service")!);
  assert.deepEqual(watch.slice(0, 4), [
    INSTALLED_BINARY,
    "watch",
    "/dev/loop3",
    "/var/lib/sectorlog/loop3",
  ]);
  const compact = execStart("sectorlog-compact@.service", all.get("sectorlog-compact@.service")!);
  assert.ok(compact.includes("--keep"), `compact without --keep: ${compact.join(" ")}`);
  for (const timer of ["sectorlog-compact@.timer", "sectorlog-verify@.timer"]) {
    const unit = all.get(timer)!;
    // Once a day: a calendar spec with a fixed time and every day.
    assert.match(value(unit, "Timer", "OnCalendar") ?? "", /^(daily|\*-\*-\* \d\d:\d\d(:\d\d)?)$/);
    assert.equal(value(unit, "Timer", "Persistent"), "true", timer);
    assert.equal(value(unit, "Install", "WantedBy"), "timers.target", timer);
  }
});

Deno.test("units: every ExecStart is a valid sectorlog command line", async () => {
  for (const [name, unit] of await units()) {
    if (!name.endsWith(".service")) continue;
    const words = execStart(name, unit);
    assert.equal(words[0], INSTALLED_BINARY, `${name}: ExecStart runs ${words[0]}`);
    assert.deepEqual(commandLineProblems(words.slice(1)), [], `${name}: ${words.join(" ")}`);
  }
});

const VERIFY = "units: systemd-analyze verify finds no problem in any unit";
Deno.test({
  name: VERIFY,
  ignore: skipReason(VERIFY, ["systemd-analyze"]) !== undefined,
  fn: () =>
    withTempDir(async (dir) => {
      // systemd-analyze checks that ExecStart's program exists: point it at a real executable.
      const bin = await writeCliWrapper(join(dir, "bin"));
      const unitDir = join(dir, "units");
      await Deno.mkdir(unitDir);
      const files: string[] = [];
      for await (const entry of Deno.readDir(SYSTEMD_DIR)) {
        const text = await Deno.readTextFile(join(SYSTEMD_DIR, entry.name));
        await Deno.writeTextFile(
          join(unitDir, entry.name),
          text.replaceAll(INSTALLED_BINARY, join(bin, "sectorlog")),
        );
        // Templates are verified as instances, so that %i and %I are filled in.
        const prefix = Object.keys(INSTANCES).find((p) => entry.name.startsWith(p));
        const name = prefix === undefined
          ? entry.name
          : entry.name.replace("@.", `@${INSTANCES[prefix]}.`);
        if (name !== entry.name) await Deno.symlink(entry.name, join(unitDir, name));
        files.push(join(unitDir, name));
      }
      const result = await run("systemd-analyze", ["verify", "--man=no", ...files.sort()], {
        cwd: unitDir,
      });
      const output = result.stdout + result.stderr;
      assert.equal(result.code, 0, output);
      // Unknown keys and unparsable values are only warnings (exit 0): none may name our units.
      const ours = output.split("\n").filter((line) => line.includes("sectorlog"));
      assert.deepEqual(ours, [], output);
    }),
});

/** The cron file's lines: environment settings and jobs (schedule, user, command). */
async function cronJobs(): Promise<{ env: Map<string, string>; jobs: string[] }> {
  const env = new Map<string, string>();
  const jobs: string[] = [];
  for (const raw of (await Deno.readTextFile(CRON_FILE)).split("\n")) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) continue;
    const setting = /^([A-Z_]+)=(.*)$/.exec(line);
    if (setting !== null) {
      env.set(setting[1], setting[2]);
      continue;
    }
    const job = /^(@reboot|@daily|@hourly|@weekly|(?:[\d*/,-]+\s+){4}[\d*/,-]+)\s+(\w+)\s+(.+)$/
      .exec(line);
    assert.ok(job !== null, `not a cron.d line (schedule user command): ${line}`);
    assert.equal(job[2], "root", `cron.d jobs name their user: ${line}`);
    assert.ok(!job[3].includes("%"), `% starts stdin in crontab commands: ${line}`);
    jobs.push(job[3]);
  }
  return { env, jobs };
}

Deno.test("cron: the file parses and every sectorlog command line in it is valid", async () => {
  const { env, jobs } = await cronJobs();
  assert.match(env.get("PATH") ?? "", /\/usr\/local\/bin/);
  assert.ok(jobs.some((job) => /sectorlog compact .*--keep/.test(job)), "a compact --keep job");
  assert.ok(jobs.some((job) => job.includes("sectorlog verify")), "a verify job");
  for (const job of jobs) {
    const syntax = await run("sh", ["-n", "-c", job]);
    assert.equal(syntax.code, 0, `${job}: ${syntax.stderr}`);
    for (const segment of job.split(/;|&&|\|\||\$\(|\{|\}|\)|\bdo\b|\bexec\b/)) {
      const words = shellWords(segment.replace(/\d?>>?\s*\S+/g, ""));
      if (words[0] !== "sectorlog") continue;
      assert.deepEqual(commandLineProblems(words.slice(1)), [], segment);
    }
  }
});

const CRON_RUN = "cron: the compact and verify jobs run over a tree of logdirs";
Deno.test({
  name: CRON_RUN,
  ignore: skipReason(CRON_RUN, ["sh"]) !== undefined,
  fn: () =>
    withTempDir(async (dir) => {
      const { jobs } = await cronJobs();
      const store = join(dir, "var-lib-sectorlog");
      for (const name of ["loop3", "loop4"]) {
        const device = join(dir, `${name}.img`);
        await makeSparseImage(device, 1024 * 1024);
        await runCliOk(["snapshot", device, join(store, name)]);
        await runCliOk(["mark", join(store, name), "m1"]);
      }
      await Deno.mkdir(join(store, "not-a-logdir"));
      const bin = await writeCliWrapper(join(dir, "bin"));
      const runJob = async (job: string) => {
        const command = job.replaceAll("/var/lib/sectorlog", store);
        return await run("sh", ["-c", `PATH=${bin}:$PATH; ${command}`]);
      };
      const compactJob = jobs.find((job) => job.includes("sectorlog compact"))!;
      const verifyJob = jobs.find((job) => job.includes("sectorlog verify"))!;
      const compact = await runJob(compactJob);
      assert.equal(compact.stderr, "", "compact is quiet when all is well");
      const verify = await runJob(verifyJob);
      assert.equal(verify.stderr, "", "verify is quiet when all is well");
      assert.equal(verify.stdout, "");

      const logdir = join(store, "loop4");
      const manifest = JSON.parse(await Deno.readTextFile(join(logdir, "manifest.json")));
      const base = join(logdir, manifest.base.file);
      const bytes = await Deno.readFile(base);
      bytes[100] ^= 0xff;
      await Deno.writeFile(base, bytes);
      const damaged = await runJob(verifyJob);
      assert.match(damaged.stderr, /sectorlog verify .*loop4\/ failed: /);
      assert.ok(damaged.stderr.includes(base), damaged.stderr);
      assert.ok(!damaged.stderr.includes("loop3"), "only the damaged logdir is reported");
    }),
});
