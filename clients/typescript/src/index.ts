export * from "./decision.js";
