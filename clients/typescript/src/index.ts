export * from "./decision.js";
export * from "./projection.js";
export * from "./client.js";
export * from "./captoken.js";
