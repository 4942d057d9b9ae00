/**
 * Summarises a V8 `.cpuprofile` (from `deno run --cpu-prof`): self time per function, top N, and
 * the inclusive time of the top N call-tree roots below the program.
 *
 * Usage: `deno run -A bench/profile_summary.ts <file.cpuprofile> [top=20]`
 *
 * @module
 */

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number; columnNumber: number };
  children?: number[];
}

interface Profile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

function frameName(node: ProfileNode): string {
  const { functionName, url, lineNumber } = node.callFrame;
  const file = url.replace(/^file:\/\/.*?\/(lib|cli|bench|node_modules)\//, "$1/")
    .replace(/^ext:/, "ext:");
  return `${functionName || "(anonymous)"} ${file}${url === "" ? "" : `:${lineNumber + 1}`}`;
}

/** Self and inclusive time per function name, in ms. */
export function summarise(profile: Profile): {
  totalMs: number;
  self: [string, number][];
  inclusive: [string, number][];
} {
  const byId = new Map(profile.nodes.map((node) => [node.id, node]));
  const parent = new Map<number, number>();
  for (const node of profile.nodes) {
    for (const child of node.children ?? []) parent.set(child, node.id);
  }
  const selfUs = new Map<number, number>();
  for (let i = 0; i < profile.samples.length; i++) {
    // timeDeltas[i] is the time before sample i; attribute the next delta to this sample.
    const us = profile.timeDeltas[i + 1] ?? 0;
    selfUs.set(profile.samples[i], (selfUs.get(profile.samples[i]) ?? 0) + us);
  }
  const selfByName = new Map<string, number>();
  const inclusiveByName = new Map<string, number>();
  for (const [id, us] of selfUs) {
    const name = frameName(byId.get(id)!);
    selfByName.set(name, (selfByName.get(name) ?? 0) + us);
    // Inclusive: every distinct function on the stack gets the sample once.
    const seen = new Set<string>();
    for (let at: number | undefined = id; at !== undefined; at = parent.get(at)) {
      const frame = frameName(byId.get(at)!);
      if (seen.has(frame)) continue;
      seen.add(frame);
      inclusiveByName.set(frame, (inclusiveByName.get(frame) ?? 0) + us);
    }
  }
  const sort = (map: Map<string, number>) =>
    [...map].map(([name, us]) => [name, us / 1000] as [string, number]).sort((a, b) => b[1] - a[1]);
  return {
    totalMs: (profile.endTime - profile.startTime) / 1000,
    self: sort(selfByName),
    inclusive: sort(inclusiveByName),
  };
}

if (import.meta.main) {
  const [path, topText] = Deno.args;
  if (path === undefined) {
    console.error("usage: deno run -A bench/profile_summary.ts <file.cpuprofile> [top=20]");
    Deno.exit(2);
  }
  const top = Number(topText ?? 20);
  const { totalMs, self, inclusive } = summarise(JSON.parse(await Deno.readTextFile(path)));
  console.log(`${path}: ${totalMs.toFixed(0)} ms profiled`);
  console.log(`\ntop ${top} by self time:`);
  for (const [name, ms] of self.slice(0, top)) {
    console.log(
      `${ms.toFixed(1).padStart(9)} ms ${(ms / totalMs * 100).toFixed(1).padStart(5)}%  ${name}`,
    );
  }
  console.log(`\ntop ${top} by inclusive time:`);
  for (const [name, ms] of inclusive.slice(0, top)) {
    console.log(
      `${ms.toFixed(1).padStart(9)} ms ${(ms / totalMs * 100).toFixed(1).padStart(5)}%  ${name}`,
    );
  }
}
