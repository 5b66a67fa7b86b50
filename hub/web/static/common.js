// Shared by the chat page and the dashboard: DOM building (text only: nothing from the network is ever
// parsed as HTML), tokens kept in sessionStorage, and JSON requests to the hub's own origin.

/** el("li", {class: "x", dataset: {id: "1"}}, "text", child) */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export const $ = (selector) => document.querySelector(selector);

/** Tokens live for the browser tab only (sessionStorage), never in a cookie or the URL. */
export const tokenStore = {
  get: (name) => sessionStorage.getItem(`streamhub.${name}`),
  set: (name, token) => sessionStorage.setItem(`streamhub.${name}`, token),
  clear: (name) => sessionStorage.removeItem(`streamhub.${name}`),
};

/** The claims of a JWT, read without verifying it (the hub verifies; this only labels the page). */
export function jwtClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
  } catch {
    return null;
  }
}

export class RequestError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** GET a JSON endpoint of this hub; resolves with `data`, rejects with a RequestError. */
export async function getJson(path, token = null) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: reported below with the status
  }
  if (!response.ok || (body && body.status === "error")) {
    const error = body?.error ?? {};
    throw new RequestError(response.status, error.code ?? "http_error", error.message ?? `HTTP ${response.status}`);
  }
  return body?.data ?? body;
}

/** Dev login: a token for `userId` minted by a hub started with `hubctl --dev serve`. */
export async function devToken(userId, roles = []) {
  const query = new URLSearchParams({ user_id: userId });
  for (const role of roles) query.append("role", role);
  const data = await getJson(`/ui/dev-token?${query}`);
  return data.token;
}

export function formatTime(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}
