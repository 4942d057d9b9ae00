/**
 * The peers of the S3 benchmark (bench/s3.ts), run as their own Deno process so that their wall
 * time includes Deno start-up and loading the AWS SDK, as `sectorlog`'s does:
 *
 *   deno run -A bench/_s3_peer.ts put <plan.json>   # one PutObject per file, one at a time
 *   deno run -A bench/_s3_peer.ts get <plan.json>   # ranged GetObjects into local files
 *
 * A plan is `{ endpoint, bucket, objects: [{ key, path, sizeBytes }], partBytes?, inFlight? }`.
 * Credentials and region come from the `AWS_*` environment, as for the CLI. The client is set up
 * as lib/store/s3_store.ts sets up its own (path-style, checksums only where required: Swift's
 * s3api answers 501 to the SDK's default aws-chunked uploads); nothing else is tuned.
 *
 * Prints `{ "bytes": n, "requests": n, "durationMs": n }` on stdout.
 *
 * @module
 */
import { GetObjectCommand, PutObjectCommand, S3Client } from "@aws-sdk/client-s3";
import * as fs from "node:fs";

/** What the peer moves. */
export interface PeerPlan {
  endpoint: string;
  bucket: string;
  objects: { key: string; path: string; sizeBytes: number }[];
  /** Bytes per ranged GET (get only). */
  partBytes?: number;
  /** Ranged GETs in flight at once (get only). */
  inFlight?: number;
}

/** What the peer reports. */
export interface PeerReport {
  bytes: number;
  requests: number;
  durationMs: number;
}

const PART_BYTES_DEFAULT = 8 * 1024 * 1024;
const IN_FLIGHT_DEFAULT = 4;

function client(plan: PeerPlan): S3Client {
  return new S3Client({
    endpoint: plan.endpoint,
    region: Deno.env.get("AWS_REGION") ?? "us-east-1",
    forcePathStyle: true,
    requestChecksumCalculation: "WHEN_REQUIRED",
    responseChecksumValidation: "WHEN_REQUIRED",
  });
}

/** Reads each file whole and PutObjects it; the next starts when the previous has returned. */
async function putAll(plan: PeerPlan): Promise<PeerReport> {
  const s3 = client(plan);
  const startedMs = performance.now();
  let bytes = 0;
  try {
    for (const object of plan.objects) {
      const body = await Deno.readFile(object.path);
      if (body.length !== object.sizeBytes) {
        throw new Error(`${object.path} is ${body.length} bytes, expected ${object.sizeBytes}`);
      }
      await s3.send(new PutObjectCommand({ Bucket: plan.bucket, Key: object.key, Body: body }));
      bytes += body.length;
    }
  } finally {
    s3.destroy();
  }
  return { bytes, requests: plan.objects.length, durationMs: performance.now() - startedMs };
}

/**
 * Downloads every object in `partBytes` ranges, `inFlight` ranges at once over all objects (in
 * plan order), each written at its offset with pwrite. No fsync, no hole detection.
 */
async function getAll(plan: PeerPlan): Promise<PeerReport> {
  const s3 = client(plan);
  const partBytes = plan.partBytes ?? PART_BYTES_DEFAULT;
  const startedMs = performance.now();
  const fds = plan.objects.map((object) => fs.openSync(object.path, "w"));
  const ranges: { index: number; offsetBytes: number; lengthBytes: number }[] = [];
  plan.objects.forEach((object, index) => {
    for (let offsetBytes = 0; offsetBytes < object.sizeBytes; offsetBytes += partBytes) {
      ranges.push({
        index,
        offsetBytes,
        lengthBytes: Math.min(partBytes, object.sizeBytes - offsetBytes),
      });
    }
  });
  let next = 0;
  let bytes = 0;
  const worker = async () => {
    while (next < ranges.length) {
      const { index, offsetBytes, lengthBytes } = ranges[next++];
      const reply = await s3.send(
        new GetObjectCommand({
          Bucket: plan.bucket,
          Key: plan.objects[index].key,
          Range: `bytes=${offsetBytes}-${offsetBytes + lengthBytes - 1}`,
        }),
      );
      const data = await reply.Body!.transformToByteArray();
      if (data.length !== lengthBytes) {
        throw new Error(`${plan.objects[index].key} @${offsetBytes}: got ${data.length} bytes`);
      }
      let written = 0;
      while (written < data.length) {
        const position = offsetBytes + written;
        written += fs.writeSync(fds[index], data, written, data.length - written, position);
      }
      bytes += data.length;
    }
  };
  try {
    await Promise.all(
      Array.from({ length: plan.inFlight ?? IN_FLIGHT_DEFAULT }, () => worker()),
    );
  } finally {
    fds.forEach((fd) => fs.closeSync(fd));
    s3.destroy();
  }
  return { bytes, requests: ranges.length, durationMs: performance.now() - startedMs };
}

async function main(args: string[]): Promise<number> {
  if (args.length !== 2 || (args[0] !== "put" && args[0] !== "get")) {
    console.error("usage: deno run -A bench/_s3_peer.ts put|get <plan.json>");
    return 2;
  }
  const plan = JSON.parse(await Deno.readTextFile(args[1])) as PeerPlan;
  const report = args[0] === "put" ? await putAll(plan) : await getAll(plan);
  console.log(JSON.stringify(report));
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
