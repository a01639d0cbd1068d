// The Deno sample: server.ts is what taxiway's deno buildpack looks for; .permissions grants net and env.
const port = Number(Deno.env.get("PORT") ?? "8080");

Deno.serve({ port, hostname: "0.0.0.0" }, (req: Request) => {
  const url = new URL(req.url);
  if (url.pathname === "/healthz") {
    return Response.json({ ok: true, deno: Deno.version.deno });
  }
  return new Response("hello from deno on taxiway\n");
});
