// How chatbot-service asks capi to qualify a dialog after it has sent its reply.
//
// AnalyzeDialog may wait for the LLM (seconds), and the client must not wait for it:
// the call is fired and forgotten, with its outcome only logged. It is idempotent, so a
// call that timed out on our side but finished on the server sends nothing twice when the
// next reply triggers it again. Logs carry the dialog id and error codes only: never the
// phone number, the message text or the token.
import {
  ANALYSIS_TIMEOUT_MS,
  Code,
  ConnectError,
  createCapiClient,
  type AnalyzeDialogResponse,
} from "../src/client.js";

// One client per process: it holds one HTTP/2 session to capi.
const capi = createCapiClient(process.env["CAPI_URL"] ?? "http://127.0.0.1:50051", {
  token: process.env["CAPI_TOKEN"],
});

/** Called by chatbot-service right after its reply to the client went out. */
export function onReplySent(instanceName: string, contactPhone: string): void {
  // Not awaited on purpose: the reply path must not wait for the LLM. The promise always
  // settles into a log line, so no rejection goes unhandled.
  void capi.qualification
    .analyzeDialog({ instanceName, contactPhone }, { timeoutMs: ANALYSIS_TIMEOUT_MS })
    .then(logAnalysis, logFailure);
}

function logAnalysis(response: AnalyzeDialogResponse): void {
  const reached = response.levels.filter((decision) => decision.reached).map((d) => d.level);
  console.info(
    JSON.stringify({
      msg: "capi AnalyzeDialog done",
      dialogId: response.dialogId,
      reachedLevels: reached,
      events: response.events.length,
      llmCalled: response.llmCalled,
      skippedReason: response.skippedReason || undefined,
    }),
  );
}

function logFailure(error: unknown): void {
  const connectError = ConnectError.from(error);
  // DEADLINE_EXCEEDED only means we stopped waiting; UNAUTHENTICATED means CAPI_TOKEN is
  // wrong; UNAVAILABLE means capi is down (the next reply triggers the analysis again).
  console.error(
    JSON.stringify({
      msg: "capi AnalyzeDialog failed",
      code: Code[connectError.code],
      detail: connectError.rawMessage,
    }),
  );
}

// Try it against `make run`: `npx tsc -p . && node dist/examples/analyze_dialog.js <instance> <phone>`.
if (import.meta.url === `file://${process.argv[1] ?? ""}`) {
  const [instanceName, contactPhone] = process.argv.slice(2);
  if (instanceName === undefined || contactPhone === undefined) {
    console.error("usage: analyze_dialog.ts <instance_name> <contact_phone>");
    process.exitCode = 2;
  } else {
    onReplySent(instanceName, contactPhone);
  }
}
