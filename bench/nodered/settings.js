// Node-RED settings for the benchmark: no editor, no admin API, warnings only.
// The flow (flow.json next to this file) is mqtt in -> http request; its broker
// port, client id and sink URL come from environment variables set by bench/run.py.
// Everything else is Node-RED's default (as sites run it), e.g. the 120 s request timeout.
module.exports = {
    uiHost: "127.0.0.1",
    uiPort: parseInt(process.env.NODE_RED_PORT || "1880", 10),
    httpAdminRoot: false,
    httpNodeRoot: false,
    disableEditor: true,
    credentialSecret: false,
    flowFilePretty: false,
    logging: { console: { level: "warn", metrics: false, audit: false } },
    telemetry: { enabled: false },
    diagnostics: { enabled: false },
    runtimeState: { enabled: false },
    externalModules: { autoInstall: false, palette: { allowInstall: false } },
};
