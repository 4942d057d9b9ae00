/**
 * A real single-node OpenStack Swift with its S3 API for the object-storage tests, started by the
 * project's own tests/s3/swift.sh (one per test file, ~6 s), on free ports of 127.0.0.1.
 *
 * @module
 */
import { CreateBucketCommand, S3Client } from "@aws-sdk/client-s3";
import * as fs from "node:fs";
import { join } from "node:path";
import { S3Store, type S3StoreOptions } from "../lib/store/s3_store.ts";
import { REPO_DIR, run, runOk, which } from "./_watch_harness.ts";

/** The swift servers the script starts (Debian 12 packages swift-proxy, swift-object, …). */
const SWIFT_SERVERS = [
  "/usr/bin/swift-proxy-server",
  "/usr/bin/swift-object-server",
  "/usr/bin/swift-container-server",
  "/usr/bin/swift-account-server",
];

/** A running Swift node. */
export interface SwiftNode {
  endpoint: string;
  region: string;
  accessKeyId: string;
  secretAccessKey: string;
  /** The state dir (logs under log/). */
  dir: string;
  /** AWS_* variables that point the CLI at this node. */
  env: Record<string, string>;
  /** An S3Store of `bucket` on this node. */
  store(bucket: string, options?: S3StoreOptions): S3Store;
  createBucket(bucket: string): Promise<void>;
  /** Stops only the proxy (the S3 endpoint refuses connections until startProxy). */
  stopProxy(): Promise<void>;
  /** {@linkcode SwiftNode.stopProxy}, blocking the event loop until the proxy is gone. */
  stopProxySync(): void;
  startProxy(): Promise<void>;
  stop(): Promise<void>;
}

/** Why Swift cannot run here (printed once), or undefined when it can. */
export function swiftSkipReason(testName: string): string | undefined {
  const missing = SWIFT_SERVERS.filter((path) => !fs.existsSync(path));
  if (!fs.existsSync("/usr/bin/python3")) missing.push("/usr/bin/python3");
  if (which("curl") === undefined) missing.push("curl");
  if (missing.length === 0) return undefined;
  const reason = `missing ${missing.join(", ")} (apt-get install swift swift-proxy swift-object ` +
    "swift-container swift-account curl)";
  console.log(`skipping "${testName}": ${reason}`);
  return reason;
}

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** Starts a Swift node with tests/s3/swift.sh and waits until its S3 API answers. */
export async function startSwift(): Promise<SwiftNode> {
  const dir = await Deno.makeTempDir({ prefix: "sectorlog-swift-" });
  const script = join(REPO_DIR, "tests", "s3", "swift.sh");
  const ports = [freePort(), freePort(), freePort(), freePort()];
  const result = await run("bash", [script, "start", dir], {
    env: {
      S3_PORT: String(ports[0]),
      OBJ_PORT: String(ports[1]),
      CONT_PORT: String(ports[2]),
      ACCT_PORT: String(ports[3]),
    },
    timeoutMs: 120_000,
  });
  const stop = async () => {
    await run("bash", [script, "stop", dir]);
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  };
  if (result.code !== 0) {
    await stop();
    throw new Error(`tests/s3/swift.sh start failed (${result.code}): ${result.stderr}`);
  }
  const vars = Object.fromEntries(
    result.stdout.trim().split("\n").map((line) => line.split("=", 2) as [string, string]),
  );
  const node: SwiftNode = {
    endpoint: vars.S3_ENDPOINT,
    region: vars.S3_REGION,
    accessKeyId: vars.S3_ACCESS_KEY,
    secretAccessKey: vars.S3_SECRET_KEY,
    dir,
    env: {
      AWS_ENDPOINT_URL_S3: vars.S3_ENDPOINT,
      AWS_REGION: vars.S3_REGION,
      AWS_ACCESS_KEY_ID: vars.S3_ACCESS_KEY,
      AWS_SECRET_ACCESS_KEY: vars.S3_SECRET_KEY,
    },
    store: (bucket, options = {}) =>
      new S3Store(bucket, {
        endpoint: vars.S3_ENDPOINT,
        region: vars.S3_REGION,
        credentials: { accessKeyId: vars.S3_ACCESS_KEY, secretAccessKey: vars.S3_SECRET_KEY },
        ...options,
      }),
    createBucket: async (bucket) => {
      const client = new S3Client({
        endpoint: vars.S3_ENDPOINT,
        region: vars.S3_REGION,
        forcePathStyle: true,
        credentials: { accessKeyId: vars.S3_ACCESS_KEY, secretAccessKey: vars.S3_SECRET_KEY },
      });
      try {
        await client.send(new CreateBucketCommand({ Bucket: bucket }));
      } finally {
        client.destroy();
      }
    },
    stopProxy: async () => void await runOk("bash", [script, "proxy-stop", dir]),
    stopProxySync: () => {
      const result = new Deno.Command("bash", { args: [script, "proxy-stop", dir] }).outputSync();
      if (!result.success) throw new Error(`proxy-stop failed: ${result.code}`);
    },
    startProxy: async () => void await runOk("bash", [script, "proxy-start", dir]),
    stop,
  };
  return node;
}

/**
 * A Deno test against a throw-away Swift node: starts it, creates `options.bucket`, runs `body`
 * (its steps), stops the node. Skipped with the reason when Swift is not installed, or when
 * `options.skip` (another reason, e.g. a missing NBD tool) is set.
 */
export function swiftTest(
  name: string,
  options: { bucket: string; skip?: string },
  body: (t: Deno.TestContext, swift: SwiftNode) => Promise<void>,
): void {
  Deno.test({
    name,
    ignore: swiftSkipReason(name) !== undefined || options.skip !== undefined,
    // The SDK keeps pooled sockets and timers between requests; the node is stopped at the end.
    sanitizeResources: false,
    sanitizeOps: false,
    async fn(t) {
      const swift = await startSwift();
      try {
        await swift.createBucket(options.bucket);
        await body(t, swift);
      } finally {
        await swift.stop();
      }
    },
  });
}
