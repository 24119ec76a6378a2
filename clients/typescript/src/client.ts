// Hand-written entry point of the capi TypeScript client: one gRPC (HTTP/2) transport,
// shared by typed clients of the three capi.v1 services. Everything else in this package is
// generated into src/gen by `make proto-ts` and must not be edited by hand.
import { createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { CapiSenderService } from "./gen/capi/v1/capi_sender_service_pb.js";
import { QualificationService } from "./gen/capi/v1/qualification_service_pb.js";
import { SettingsService } from "./gen/capi/v1/settings_service_pb.js";

export * from "./gen/capi/v1/capi_sender_service_pb.js";
export * from "./gen/capi/v1/qualification_service_pb.js";
export * from "./gen/capi/v1/resources_pb.js";
export * from "./gen/capi/v1/settings_service_pb.js";
export { Code, ConnectError } from "@connectrpc/connect";

/**
 * Deadline of a call that passes no `timeoutMs` of its own. Most capi calls answer in
 * milliseconds (Meta is called with a 1.5 s budget); AnalyzeDialog and
 * GenerateQualificationPrompt may wait for the LLM, so pass ANALYSIS_TIMEOUT_MS to them.
 */
export const DEFAULT_TIMEOUT_MS = 10_000;

/** Deadline for calls that may ask the LLM (the server gives the LLM 20 s). */
export const ANALYSIS_TIMEOUT_MS = 30_000;

export interface CapiClientOptions {
  /**
   * Bearer token of this caller (one of the server's CAPI_AUTH_TOKENS). Omit only
   * against a server running with auth off (local development).
   */
  token?: string;
  /** Deadline of calls without their own `timeoutMs`; DEFAULT_TIMEOUT_MS by default. */
  timeoutMs?: number;
  /** Extra interceptors (tracing, logging), run after the auth interceptor. */
  interceptors?: Interceptor[];
}

export interface CapiClient {
  /** SendConversion, GetDialogStatus, ListEvents, RetryEvents, Diagnose, ... */
  sender: Client<typeof CapiSenderService>;
  /** IngestMessage, AnalyzeDialog, HandleCrmWebhook, CheckCrmFields, ... */
  qualification: Client<typeof QualificationService>;
  /** Accounts, CRM connections and directions. */
  settings: Client<typeof SettingsService>;
}

/** Adds `authorization: Bearer <token>` to every call, as the server's auth interceptor expects. */
export function bearerTokenInterceptor(token: string): Interceptor {
  const value = `Bearer ${token}`;
  return (next) => async (req) => {
    req.header.set("authorization", value);
    return next(req);
  };
}

/**
 * Creates typed clients of the capi services at `baseUrl`: "http://host:50051" for
 * plaintext HTTP/2 inside the cluster, "https://host" for TLS. The clients share one
 * HTTP/2 session; create them once per process and reuse them.
 */
export function createCapiClient(baseUrl: string, options: CapiClientOptions = {}): CapiClient {
  const interceptors: Interceptor[] = [];
  if (options.token !== undefined && options.token !== "") {
    interceptors.push(bearerTokenInterceptor(options.token));
  }
  interceptors.push(...(options.interceptors ?? []));
  const transport = createGrpcTransport({
    baseUrl,
    interceptors,
    defaultTimeoutMs: options.timeoutMs ?? DEFAULT_TIMEOUT_MS,
  });
  return {
    sender: createClient(CapiSenderService, transport),
    qualification: createClient(QualificationService, transport),
    settings: createClient(SettingsService, transport),
  };
}
