/**
 * The sending end of ship: connects to a receiver, proves its key, learns what the receiver
 * holds, sends the base and levels when the receiver needs them, then streams entries and
 * advances only on the receiver's acks (each ack follows an fsync on the receiver). With
 * `follow`, it tails the live logdir and reconnects with jittered, capped exponential backoff.
 *
 * The sender only reads the logdir: it never deletes or compacts anything.
 *
 * @module
 */
import * as fs from "node:fs";
import { join } from "node:path";
import { AssertionError } from "../_assert.ts";
import { crc32c, crc32cCombine, crc32cOfZeros } from "../checksum.ts";
import { BusyError, IntegrityError, UsageError } from "../errors.ts";
import { ENTRY_FORMAT_VERSION } from "../format/entry.ts";
import { LEVELS_DIR, readManifest } from "../format/logdir.ts";
import { type Manifest, MANIFEST_FORMAT_VERSION } from "../format/manifest.ts";
import { readFully } from "../fd_io.ts";
import { sleep } from "../sleep.ts";
import { HOLE_BLOCK_BYTES, isAllZero } from "../sparse_copy.ts";
import { formatTimeUtc, nowUs } from "../time.ts";
import { applyFromSeq } from "../timeline.ts";
import {
  baseId,
  hostIdProblem,
  parseServerHello,
  parseWelcome,
  PROTOCOL_NAME,
  type StateReason,
  type StoreState,
  uintField,
  type Welcome,
} from "./_messages.ts";
import {
  clientProof,
  constantTimeEqual,
  fromHex,
  makeNonce,
  NONCE_BYTES,
  serverProof,
  type ShipKey,
  toHex,
} from "./auth.ts";
import { LogTail, type TailRun } from "./log_tail.ts";
import {
  CHUNK_RAW_BYTES_MAX,
  closeQuietly,
  compressChunk,
  CONTROL_BYTES_MAX,
  crc32cHex,
  decodeErrorBody,
  decodeJsonBody,
  encodeChunkBody,
  encodeFrame,
  encodeJsonFrame,
  ENTRIES_FRAME_BYTES,
  type ErrorBody,
  type Frame,
  FRAME_TYPES,
  frameEnvelope,
  FrameReader,
  frameTypeName,
  PROTOCOL_VERSION,
  ProtocolError,
  writeAll,
} from "./wire.ts";

/** Most bytes of entries sent and not yet acked. */
export const WINDOW_BYTES_MAX = 32 * 1024 * 1024;
/** How often `follow` looks for new entries. */
export const POLL_MS = 200;
/** First reconnect delay; it doubles per failed attempt up to {@linkcode BACKOFF_MS_MAX}. */
export const BACKOFF_MS_MIN = 200;
/** Longest reconnect delay. */
export const BACKOFF_MS_MAX = 10_000;
/** Longest the sender waits for the receiver's hello and welcome. */
export const SENDER_HANDSHAKE_MS_MAX = 15_000;
/** Attempts without `follow` before a network error is final. */
export const ATTEMPTS_MAX = 4;
/** How often progress (with lag) is reported. */
export const REPORT_MS = 1_000;
/** How often an idle follow checks that the log has not moved on without it (a compaction). */
const OVERTAKEN_CHECK_MS = 2_000;

/** Where to ship to. */
export interface ShipTarget {
  hostname: string;
  port: number;
}

/** Options of {@linkcode shipLogdir}. */
export interface ShipOptions {
  /** The host id on the receiver (default: the logdir's manifest hostId). */
  hostId?: string;
  /** Prove this key to the receiver, and require its proof back. */
  key?: ShipKey;
  /** Connect with TLS, trusting `caCerts` (PEM) or, when absent, the system's roots. */
  tls?: { caCerts?: string[] };
  /** Replace a receiver copy of another logdir, another device size, or one that diverged. */
  force?: boolean;
  /** Keep tailing the logdir and reconnecting until `signal` aborts. */
  follow?: boolean;
  /** Stops a follow (what is sent is still acked first, within a bounded time). */
  signal?: AbortSignal;
  onEvent?: (event: ShipEvent) => void;
  pollMs?: number;
  reportMs?: number;
  windowBytes?: number;
  backoffMsMin?: number;
  backoffMsMax?: number;
  attemptsMax?: number;
}

/** How far the receiver is behind the source. */
export interface ShipLag {
  /** Entries read from the source and not yet acked. */
  entries: number;
  /** Journal bytes not yet acked (sent but unacked, plus not yet read). */
  bytes: number;
  /** Age of the oldest entry sent and not yet acked (0 when all are acked). */
  seconds: number;
  /** False when bytes remain unread, so more entries than `entries` are behind. */
  exact: boolean;
}

/** What a session decided to do after the handshake. */
export interface ShipPlan {
  action: "resume" | "state";
  reason?: StateReason;
  /** First seq of entries to send. */
  fromSeq: number;
  baseIncluded: boolean;
  levels: number;
  /** Set when the receiver's horizon moves (compacted state or replacement). */
  horizonMove?: { fromUs?: number; toUs: number };
}

/** Something that happened while shipping, for the caller to show. */
export type ShipEvent =
  | { kind: "connected"; session: number; address: string; store: StoreState; plan: ShipPlan }
  | { kind: "state"; phase: "base" | "level"; doneBytes: number; totalBytes: number }
  | {
    kind: "progress";
    ackedSeq: number;
    sentSeq: number;
    ackedBytes: number;
    totalBytes: number;
    lag: ShipLag;
    caughtUp: boolean;
  }
  | { kind: "disconnected"; error: Error; retryInMs: number; attempt: number };

/** What {@linkcode shipLogdir} did. */
export interface ShipResult {
  logdir: string;
  hostId: string;
  target: string;
  /** Sessions (connections that completed a handshake). */
  sessions: number;
  /** The last seq the receiver acked. */
  lastSeq: number;
  entriesSent: number;
  entryBytesSent: number;
  statesSent: number;
  baseBytesSent: number;
  horizonMoves: { fromUs?: number; toUs: number }[];
  lag: ShipLag;
  durationMs: number;
}

/** An ERROR frame from the receiver. */
export class RemoteError extends Error {
  override name = "RemoteError";
  readonly body: ErrorBody;
  constructor(body: ErrorBody) {
    super(body.message);
    this.body = body;
  }
}

/**
 * Ships `logdir` to the receiver at `target`. Without `follow`, returns once the receiver has
 * acked every entry present at the end of the catch-up; with it, runs until `signal` aborts.
 *
 * @example
 * ```ts
 * import { shipLogdir } from "./sender.ts";
 * const result = await shipLogdir("/var/lib/sectorlog/vm1", { hostname: "backup", port: 7420 });
 * console.log(`receiver holds seq ${result.lastSeq}`);
 * ```
 */
export async function shipLogdir(
  logdir: string,
  target: ShipTarget,
  options: ShipOptions = {},
): Promise<ShipResult> {
  const startedMs = performance.now();
  const manifest = await readManifest(logdir);
  const hostId = options.hostId ?? manifest.hostId;
  const problem = hostIdProblem(hostId);
  if (problem !== undefined) {
    throw new UsageError(`Invalid host id ${JSON.stringify(hostId)}: ${problem}`, {
      hint: "pass --host-id with a valid id",
    });
  }
  const result: ShipResult = {
    logdir,
    hostId,
    target: `${target.hostname}:${target.port}`,
    sessions: 0,
    lastSeq: 0,
    entriesSent: 0,
    entryBytesSent: 0,
    statesSent: 0,
    baseBytesSent: 0,
    horizonMoves: [],
    lag: { entries: 0, bytes: 0, seconds: 0, exact: true },
    durationMs: 0,
  };
  let attempt = 0;
  for (;;) {
    const session = new SenderSession(logdir, target, hostId, options, result);
    try {
      await session.run();
      break;
    } catch (error) {
      if (session.welcomed) attempt = 0;
      attempt++;
      if (isFatal(error, result.sessions > 0 && options.follow === true)) throw error;
      const attemptsMax = options.attemptsMax ?? ATTEMPTS_MAX;
      if (options.follow !== true && attempt >= attemptsMax) throw error;
      if (options.signal?.aborted === true) break;
      const retryInMs = backoffMs(attempt, options);
      options.onEvent?.({ kind: "disconnected", error: error as Error, retryInMs, attempt });
      await sleep(retryInMs, options.signal);
      if (aborted(options.signal)) break;
    }
  }
  result.durationMs = Math.round(performance.now() - startedMs);
  return result;
}

/** Errors that reconnecting cannot fix. */
function isFatal(error: unknown, retryBusy: boolean): boolean {
  if (error instanceof BusyError) return !retryBusy;
  return error instanceof UsageError || error instanceof IntegrityError ||
    error instanceof AssertionError;
}

function backoffMs(attempt: number, options: ShipOptions): number {
  const min = options.backoffMsMin ?? BACKOFF_MS_MIN;
  const max = options.backoffMsMax ?? BACKOFF_MS_MAX;
  const capped = Math.min(max, min * 2 ** Math.min(attempt - 1, 20));
  // Full jitter in [capped/2, capped]: many senders restarted together do not reconnect together.
  return Math.round(capped / 2 + Math.random() * capped / 2);
}

function aborted(signal: AbortSignal | undefined): boolean {
  return signal?.aborted === true;
}

/** Turns a receiver's ERROR into the error class of its exit code. */
function remoteToError(body: ErrorBody, target: string): Error {
  const message = `Receiver ${target} refused: ${body.message}`;
  switch (body.code) {
    case "busy":
      return new BusyError(message);
    case "auth":
    case "version":
    case "host":
    case "identity":
      return new UsageError(message, { hint: body.hint });
    case "integrity":
      return new IntegrityError(message);
    default:
      return new RemoteError({ ...body, message });
  }
}

/** Acks from the receiver, the window of unacked frames, and any error of the reader task. */
class AckTracker {
  ackedSeq: number;
  ackedBytes = 0;
  /** ACK frames received: a state is installed once an ACK arrives after its STATE_END. */
  acks = 0;
  #batches: { lastSeq: number; bytes: number; firstTimeUs: number }[] = [];
  #unackedBytes = 0;
  #error: Error | undefined;
  #wake: (() => void) | undefined;
  lastFrameMs = performance.now();

  constructor(ackedSeq: number) {
    this.ackedSeq = ackedSeq;
  }

  get unackedBytes(): number {
    return this.#unackedBytes;
  }

  get error(): Error | undefined {
    return this.#error;
  }

  /** Time stamp of the oldest unacked entry, if any. */
  get oldestUnackedUs(): number | undefined {
    return this.#batches[0]?.firstTimeUs;
  }

  sent(lastSeq: number, bytes: number, firstTimeUs: number): void {
    this.#batches.push({ lastSeq, bytes, firstTimeUs });
    this.#unackedBytes += bytes;
  }

  onAck(seq: number): void {
    this.acks++;
    this.lastFrameMs = performance.now();
    if (seq > this.ackedSeq) this.ackedSeq = seq;
    while (this.#batches.length > 0 && this.#batches[0].lastSeq <= this.ackedSeq) {
      const batch = this.#batches.shift()!;
      this.#unackedBytes -= batch.bytes;
      this.ackedBytes += batch.bytes;
    }
    this.#notify();
  }

  fail(error: Error): void {
    this.#error ??= error;
    this.#notify();
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  /** Resolves on the next ack or error, or after `ms`. */
  async waitForChange(ms: number): Promise<void> {
    if (this.#error !== undefined) throw this.#error;
    let timer: ReturnType<typeof setTimeout> | undefined;
    await new Promise<void>((resolve) => {
      this.#wake = resolve;
      timer = setTimeout(resolve, ms);
    });
    clearTimeout(timer);
    if (this.#error !== undefined) throw this.#error;
  }
}

/** One connection: handshake, plan, state, entries. */
class SenderSession {
  welcomed = false;
  #logdir: string;
  #target: ShipTarget;
  #hostId: string;
  #options: ShipOptions;
  #result: ShipResult;
  #conn: Deno.Conn | undefined;
  #reader: FrameReader | undefined;
  #acks = new AckTracker(0);
  #idleMsMax = 60_000;
  #lastSendMs = performance.now();
  #lastReportMs = 0;
  #lastOvertakenCheckMs = 0;
  #sentSeq = 0;
  #lastReadSeq = 0;
  #totalBytes = 0;

  constructor(
    logdir: string,
    target: ShipTarget,
    hostId: string,
    options: ShipOptions,
    result: ShipResult,
  ) {
    this.#logdir = logdir;
    this.#target = target;
    this.#hostId = hostId;
    this.#options = options;
    this.#result = result;
  }

  async run(): Promise<void> {
    const manifest = await readManifest(this.#logdir);
    this.#conn = await this.#connect();
    let readerTask: Promise<void> | undefined;
    let tail: LogTail | undefined;
    try {
      this.#reader = new FrameReader(this.#conn, { frameBytesMax: CONTROL_BYTES_MAX });
      const welcome = await this.#withDeadline(this.#handshake(manifest), "handshake");
      this.welcomed = true;
      this.#result.sessions++;
      this.#idleMsMax = welcome.idleMsMax;
      this.#acks = new AckTracker(welcome.store.lastSeq);
      readerTask = this.#readAcks();
      const plan = await makePlan(this.#logdir, manifest, welcome.store, this.#options.force);
      tail = plan.tail;
      this.#sentSeq = plan.plan.fromSeq - 1;
      // A replaced copy may have held more than the new state: acks count from the new state.
      if (plan.plan.action === "state") this.#acks.ackedSeq = this.#sentSeq;
      this.#lastReadSeq = this.#sentSeq;
      this.#totalBytes = tail.pendingBytes();
      this.#options.onEvent?.({
        kind: "connected",
        session: this.#result.sessions,
        address: this.#result.target,
        store: welcome.store,
        plan: plan.plan,
      });
      // The receiver acks STATE_END once the state is swapped in and durable, before any ENTRIES
      // ack: without entries to send, that ack is what says the ship is done.
      const acksMin = plan.plan.action === "state" ? this.#acks.acks + 1 : 0;
      if (plan.plan.action === "state") await this.#sendState(manifest, plan.plan);
      await this.#streamEntries(tail);
      await this.#waitAcked(this.#sentSeq, acksMin);
      this.#report(tail, true);
      await writeAll(this.#conn, encodeJsonFrame(FRAME_TYPES.BYE, {}));
    } finally {
      tail?.close();
      this.#result.lastSeq = Math.max(this.#result.lastSeq, this.#acks.ackedSeq);
      closeQuietly(this.#conn);
      await readerTask;
    }
  }

  async #connect(): Promise<Deno.Conn> {
    const { hostname, port } = this.#target;
    const where = `${hostname}:${port}`;
    const failed = (error: unknown): never => {
      throw new Error(`Cannot connect to ${where}: ${(error as Error).message}`, { cause: error });
    };
    if (this.#options.tls === undefined) {
      return await Deno.connect({ hostname, port }).catch(failed);
    }
    const conn = await Deno.connectTls({ hostname, port, caCerts: this.#options.tls.caCerts })
      .catch(failed);
    try {
      await conn.handshake();
    } catch (error) {
      closeQuietly(conn);
      const message = (error as Error).message;
      if (/certificate|UnknownIssuer|BadSignature|NotValidForName|Expired/i.test(message)) {
        throw new UsageError(`Cannot ship to ${where}: TLS certificate not trusted (${message})`, {
          hint: "pass --tls-ca with the CA certificate that signed the receiver's certificate",
        });
      }
      throw new Error(`Cannot ship to ${where}: TLS handshake failed (${message})`, {
        cause: error,
      });
    }
    return conn;
  }

  async #withDeadline<T>(work: Promise<T>, what: string): Promise<T> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    let timedOut = false;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        timedOut = true;
        closeQuietly(this.#conn!);
        reject(
          new Error(
            `The receiver did not complete the ${what} within ${SENDER_HANDSHAKE_MS_MAX} ms`,
          ),
        );
      }, SENDER_HANDSHAKE_MS_MAX);
    });
    try {
      return await Promise.race([work, deadline]);
    } catch (error) {
      if (timedOut) await work.catch(() => {});
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  async #readControl(expected: number): Promise<Frame> {
    const frame = await this.#reader!.read();
    if (frame === undefined) {
      throw new Error(`Receiver ${this.#result.target} closed the connection during the handshake`);
    }
    if (frame.type === FRAME_TYPES.ERROR) {
      throw remoteToError(decodeErrorBody(frame), this.#result.target);
    }
    if (frame.type !== expected) {
      throw new ProtocolError(
        `Expected ${frameTypeName(expected)} from the receiver, got ${frameTypeName(frame.type)}`,
      );
    }
    return frame;
  }

  async #handshake(manifest: Manifest): Promise<Welcome> {
    const helloFrame = await this.#readControl(FRAME_TYPES.SERVER_HELLO);
    const hello = parseServerHello(helloFrame, decodeJsonBody(helloFrame));
    const target = this.#result.target;
    if (hello.version !== PROTOCOL_VERSION) {
      throw new UsageError(
        `Cannot ship to ${target}: it speaks protocol version ${hello.version}, this sender ${PROTOCOL_VERSION}`,
        { hint: "run the same sectorlog version on both sides" },
      );
    }
    const key = this.#options.key;
    if (hello.authRequired && key === undefined) {
      throw new UsageError(`Cannot ship to ${target}: the receiver requires a key`, {
        hint: "pass --key-file with the receiver's key",
      });
    }
    if (!hello.authRequired && key !== undefined) {
      throw new UsageError(
        `Cannot ship to ${target}: --key-file was given but the receiver does not check keys, so it cannot prove it holds the key`,
        { hint: "start receive with the same --key-file, or ship without one" },
      );
    }
    const nonceS = fromHex(hello.nonce, NONCE_BYTES);
    if (nonceS === undefined) throw new ProtocolError("SERVER_HELLO nonce is not 32 bytes of hex");
    const nonceC = makeNonce();
    const nonces = { server: nonceS, client: nonceC };
    await writeAll(
      this.#conn!,
      encodeJsonFrame(FRAME_TYPES.CLIENT_HELLO, {
        protocol: PROTOCOL_NAME,
        version: PROTOCOL_VERSION,
        entryFormatVersion: ENTRY_FORMAT_VERSION,
        manifestFormatVersion: MANIFEST_FORMAT_VERSION,
        hostId: this.#hostId,
        logdirId: manifest.logdirId,
        deviceBytes: manifest.deviceBytes,
        sectorBytes: manifest.sectorBytes,
        nonce: toHex(nonceC),
        proof: key === undefined ? undefined : toHex(await clientProof(key, nonces, this.#hostId)),
        force: this.#options.force === true,
      }),
    );
    const welcomeFrame = await this.#readControl(FRAME_TYPES.WELCOME);
    const welcome = parseWelcome(welcomeFrame, decodeJsonBody(welcomeFrame));
    if (key !== undefined) {
      const proof = fromHex(welcome.proof, 32);
      const expected = await serverProof(key, nonces, this.#hostId);
      if (proof === undefined || !constantTimeEqual(proof, expected)) {
        throw new UsageError(
          `Cannot ship to ${target}: the receiver could not prove it holds the key in --key-file ${key.path}`,
          { hint: "check that both sides use the same key file" },
        );
      }
    }
    return welcome;
  }

  async #readAcks(): Promise<void> {
    try {
      for (;;) {
        const frame = await this.#reader!.read();
        if (frame === undefined) {
          throw new Error(`Receiver ${this.#result.target} closed the connection`);
        }
        if (frame.type === FRAME_TYPES.ACK) {
          this.#acks.onAck(uintField(frame, decodeJsonBody(frame), "lastSeq"));
        } else if (frame.type === FRAME_TYPES.ERROR) {
          throw remoteToError(decodeErrorBody(frame), this.#result.target);
        } else {
          throw new ProtocolError(
            `Unexpected ${frameTypeName(frame.type)} frame from the receiver`,
          );
        }
      }
    } catch (error) {
      this.#acks.fail(error as Error);
    }
  }

  async #send(frame: Uint8Array): Promise<void> {
    if (this.#acks.error !== undefined) throw this.#acks.error;
    await writeAll(this.#conn!, frame);
    this.#lastSendMs = performance.now();
  }

  async #sendState(manifest: Manifest, plan: ShipPlan): Promise<void> {
    await this.#send(encodeJsonFrame(FRAME_TYPES.STATE_BEGIN, {
      reason: plan.reason,
      logdirId: manifest.logdirId,
      createdUs: manifest.createdUs,
      deviceBytes: manifest.deviceBytes,
      sectorBytes: manifest.sectorBytes,
      base: manifest.base,
      horizonUs: manifest.horizonUs,
      levels: manifest.levels,
      compactedMarks: manifest.compactedMarks,
      baseIncluded: plan.baseIncluded,
    }));
    if (plan.baseIncluded) await this.#sendBase(manifest);
    for (const level of manifest.levels) {
      await this.#sendLevel(
        join(this.#logdir, LEVELS_DIR, level.file),
        level.file,
        level.sizeBytes,
      );
    }
    await this.#send(encodeJsonFrame(FRAME_TYPES.STATE_END, {}));
    if (plan.horizonMove !== undefined) this.#result.horizonMoves.push(plan.horizonMove);
    this.#result.statesSent++;
  }

  async #sendBase(manifest: Manifest): Promise<void> {
    const path = join(this.#logdir, manifest.base.file);
    const fd = fs.openSync(path, "r");
    try {
      const sizeBytes = fs.fstatSync(fd).size;
      if (sizeBytes !== manifest.deviceBytes) {
        throw new IntegrityError(
          `Base snapshot ${path} is ${sizeBytes} bytes, the manifest says ${manifest.deviceBytes}`,
          { path },
        );
      }
      let baseCrc32c = 0;
      const chunk = new Uint8Array(CHUNK_RAW_BYTES_MAX);
      let dataBytes = 0;
      for (let offset = 0; offset < sizeBytes; offset += chunk.length) {
        const bytes = chunk.subarray(0, Math.min(chunk.length, sizeBytes - offset));
        readFully(fd, bytes, bytes.length, offset);
        const runs = nonZeroRuns(bytes);
        baseCrc32c = crc32cCombine(baseCrc32c, crc32cOfRuns(bytes, runs), bytes.length);
        for (const run of runs) {
          const raw = bytes.subarray(run.start, run.end);
          const body = encodeChunkBody({
            offsetBytes: offset + run.start,
            rawBytes: raw.length,
            compressed: compressChunk(raw),
          });
          await this.#send(encodeFrame(FRAME_TYPES.BASE_CHUNK, body));
          dataBytes += raw.length;
          this.#result.baseBytesSent += body.length;
        }
        this.#options.onEvent?.({
          kind: "state",
          phase: "base",
          doneBytes: offset + bytes.length,
          totalBytes: sizeBytes,
        });
      }
      const baseHex = crc32cHex(baseCrc32c);
      if (baseHex !== manifest.base.crc32c) {
        throw new IntegrityError(
          `Base snapshot ${path} does not match its checksum (crc32c ${baseHex}, expected ${manifest.base.crc32c})`,
          { path },
        );
      }
      await this.#send(
        encodeJsonFrame(FRAME_TYPES.BASE_END, { crc32c: baseHex, dataBytes }),
      );
    } finally {
      fs.closeSync(fd);
    }
  }

  async #sendLevel(path: string, file: string, sizeBytes: number): Promise<void> {
    const fd = fs.openSync(path, "r");
    try {
      await this.#send(encodeJsonFrame(FRAME_TYPES.LEVEL_BEGIN, { file }));
      let levelCrc32c = 0;
      const chunk = new Uint8Array(CHUNK_RAW_BYTES_MAX);
      for (let offset = 0; offset < sizeBytes; offset += chunk.length) {
        const bytes = chunk.subarray(0, Math.min(chunk.length, sizeBytes - offset));
        readFully(fd, bytes, bytes.length, offset);
        levelCrc32c = crc32cCombine(levelCrc32c, crc32c(bytes), bytes.length);
        const body = encodeChunkBody({
          offsetBytes: offset,
          rawBytes: bytes.length,
          compressed: compressChunk(bytes),
        });
        await this.#send(encodeFrame(FRAME_TYPES.LEVEL_CHUNK, body));
        this.#options.onEvent?.({
          kind: "state",
          phase: "level",
          doneBytes: offset + bytes.length,
          totalBytes: sizeBytes,
        });
      }
      await this.#send(
        encodeJsonFrame(FRAME_TYPES.LEVEL_END, { crc32c: crc32cHex(levelCrc32c) }),
      );
    } finally {
      fs.closeSync(fd);
    }
  }

  async #streamEntries(tail: LogTail): Promise<void> {
    const follow = this.#options.follow === true;
    const signal = this.#options.signal;
    for (;;) {
      if (signal?.aborted === true) break;
      const run = await tail.nextRun(ENTRIES_FRAME_BYTES);
      if (run !== undefined) {
        this.#lastReadSeq = run.lastSeq;
        await this.#sendRun(run);
        this.#report(tail, false);
        continue;
      }
      if (!follow) break;
      if (performance.now() - this.#lastOvertakenCheckMs > OVERTAKEN_CHECK_MS) {
        this.#lastOvertakenCheckMs = performance.now();
        tail.checkOvertaken();
      }
      this.#report(tail, false);
      await this.#keepAlive();
      await this.#acks.waitForChange(this.#options.pollMs ?? POLL_MS);
    }
  }

  /**
   * Sends a run of entries as one ENTRIES frame, its body written from the tail's buffer as it
   * is (no copy into a frame), its checksum combined from the CRCs the tail computed.
   */
  async #sendRun(run: TailRun): Promise<void> {
    const { head, tail } = frameEnvelope(FRAME_TYPES.ENTRIES, run.bytes.length, run.crc32c);
    const frameBytes = head.length + run.bytes.length + tail.length;
    await this.#waitWindow(frameBytes);
    await this.#send(head);
    await this.#send(run.bytes);
    await this.#send(tail);
    this.#acks.sent(run.lastSeq, frameBytes, run.firstTimeUs);
    this.#sentSeq = run.lastSeq;
    this.#result.entriesSent += run.entries;
    this.#result.entryBytesSent += frameBytes;
  }

  async #waitWindow(bytes: number): Promise<void> {
    const windowBytes = this.#options.windowBytes ?? WINDOW_BYTES_MAX;
    while (this.#acks.unackedBytes > 0 && this.#acks.unackedBytes + bytes > windowBytes) {
      await this.#acks.waitForChange(1_000);
      this.#checkAckTimeout();
    }
  }

  /**
   * Waits until the receiver acks `seq` and has sent at least `acksMin` ACK frames, bounded by the
   * receiver's idle limit.
   */
  async #waitAcked(seq: number, acksMin = 0): Promise<void> {
    const deadlineMs = performance.now() + Math.max(this.#idleMsMax, 30_000);
    while (this.#acks.ackedSeq < seq || this.#acks.acks < acksMin) {
      if (performance.now() > deadlineMs) {
        throw new Error(
          `No ack for seq ${seq} from ${this.#result.target} within ${this.#idleMsMax} ms`,
        );
      }
      await this.#acks.waitForChange(1_000);
    }
  }

  #checkAckTimeout(): void {
    const silentMs = performance.now() - this.#acks.lastFrameMs;
    if (this.#acks.unackedBytes > 0 && silentMs > Math.max(this.#idleMsMax, 30_000)) {
      throw new Error(
        `No ack from ${this.#result.target} for ${
          Math.round(silentMs)
        } ms with ${this.#acks.unackedBytes} bytes unacked`,
      );
    }
  }

  /** Pings when nothing was sent for a third of the receiver's idle limit. */
  async #keepAlive(): Promise<void> {
    this.#checkAckTimeout();
    if (performance.now() - this.#lastSendMs < this.#idleMsMax / 3) return;
    await this.#send(encodeJsonFrame(FRAME_TYPES.PING, {}));
    if (performance.now() - this.#acks.lastFrameMs > this.#idleMsMax) {
      throw new Error(`No answer from ${this.#result.target} for ${this.#idleMsMax} ms`);
    }
  }

  #report(tail: LogTail, force: boolean): void {
    const now = performance.now();
    const reportMs = this.#options.reportMs ?? REPORT_MS;
    if (!force && now - this.#lastReportMs < reportMs) return;
    this.#lastReportMs = now;
    const pendingBytes = tail.pendingBytes();
    const oldestUs = this.#acks.oldestUnackedUs;
    const lag: ShipLag = {
      entries: Math.max(0, this.#lastReadSeq - this.#acks.ackedSeq),
      bytes: this.#acks.unackedBytes + pendingBytes,
      seconds: oldestUs === undefined ? 0 : Math.max(0, (nowUs() - oldestUs) / 1e6),
      exact: pendingBytes === 0,
    };
    this.#result.lag = lag;
    this.#result.lastSeq = Math.max(this.#result.lastSeq, this.#acks.ackedSeq);
    this.#options.onEvent?.({
      kind: "progress",
      ackedSeq: this.#acks.ackedSeq,
      sentSeq: this.#sentSeq,
      ackedBytes: this.#acks.ackedBytes,
      totalBytes: Math.max(this.#totalBytes, this.#acks.ackedBytes + lag.bytes),
      lag,
      caughtUp: lag.bytes === 0 && lag.entries === 0,
    });
  }
}

/**
 * CRC32C of `bytes` from its non-zero runs: the zero blocks between them, already read by
 * {@linkcode nonZeroRuns}, are counted in O(log n) instead of hashed (most of a base is holes).
 */
function crc32cOfRuns(bytes: Uint8Array, runs: { start: number; end: number }[]): number {
  let crc = 0;
  let at = 0;
  for (const run of runs) {
    crc = crc32cCombine(crc, crc32cOfZeros(run.start - at), run.start - at);
    crc = crc32cCombine(crc, crc32c(bytes.subarray(run.start, run.end)), run.end - run.start);
    at = run.end;
  }
  return crc32cCombine(crc, crc32cOfZeros(bytes.length - at), bytes.length - at);
}

/** Runs of non-zero 4 KiB blocks in `bytes`. */
function nonZeroRuns(bytes: Uint8Array): { start: number; end: number }[] {
  const runs: { start: number; end: number }[] = [];
  let runStart = -1;
  for (let block = 0; block <= bytes.length; block += HOLE_BLOCK_BYTES) {
    const end = Math.min(block + HOLE_BLOCK_BYTES, bytes.length);
    const zero = block >= bytes.length || isAllZero(bytes.subarray(block, end));
    if (!zero && runStart < 0) runStart = block;
    if (zero && runStart >= 0) {
      runs.push({ start: runStart, end: Math.min(block, bytes.length) });
      runStart = -1;
    }
  }
  return runs;
}

/**
 * Decides what to send: resume after the receiver's last seq when the source still holds the
 * entries after it and agrees on that last entry; otherwise a whole state (base and levels).
 */
async function makePlan(
  logdir: string,
  manifest: Manifest,
  store: StoreState,
  force: boolean | undefined,
): Promise<{ plan: ShipPlan; tail: LogTail }> {
  const sourceFrom = applyFromSeq(manifest);
  const state = async (reason: StateReason) => {
    const tail = await LogTail.open(logdir, manifest, sourceFrom);
    if (typeof tail === "string") {
      throw new Error(`The source logdir ${logdir} changed while planning (${tail}); retrying`);
    }
    const sameBase = store.present && store.logdirId === manifest.logdirId &&
      store.deviceBytes === manifest.deviceBytes && store.baseId === baseId(manifest.base);
    const plan: ShipPlan = {
      action: "state",
      reason,
      fromSeq: sourceFrom,
      baseIncluded: !sameBase,
      levels: manifest.levels.length,
      horizonMove: store.present && store.horizonUs !== manifest.horizonUs
        ? { fromUs: store.horizonUs, toUs: manifest.horizonUs }
        : undefined,
    };
    return { plan, tail };
  };
  if (!store.present) return await state("new");
  if (store.logdirId !== manifest.logdirId || store.deviceBytes !== manifest.deviceBytes) {
    return await state("replaced");
  }
  const lastSeq = store.lastSeq;
  if (lastSeq + 1 < sourceFrom) return await state("compacted");
  const checkLast = store.lastHeaderCrc32c !== undefined && lastSeq >= sourceFrom;
  const tail = await LogTail.open(logdir, manifest, checkLast ? lastSeq : lastSeq + 1);
  if (tail === "before-start") {
    throw new Error(`The source logdir ${logdir} was compacted while planning; retrying`);
  }
  let agrees = tail !== "after-end";
  if (tail !== "after-end" && checkLast) {
    const last = await tail.next();
    agrees = last !== undefined && last.headerCrc32c === store.lastHeaderCrc32c;
  }
  if (agrees && tail !== "after-end") {
    const plan: ShipPlan = {
      action: "resume",
      fromSeq: lastSeq + 1,
      baseIncluded: false,
      levels: 0,
    };
    return { plan, tail };
  }
  if (tail !== "after-end") tail.close();
  if (force === true) return await state("replaced");
  throw new UsageError(
    `Cannot ship ${logdir}: the receiver's copy has diverged from it (the receiver holds seq ${lastSeq}${
      store.horizonUs === undefined ? "" : ` since ${formatTimeUtc(store.horizonUs)}`
    }, which this logdir does not hold or holds with different content; was the source restored or did it lose unflushed entries in a crash?)`,
    { hint: "pass --force to replace the receiver's copy with this logdir" },
  );
}
