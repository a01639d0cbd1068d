// The Node sample: express on $PORT (taxiway's node buildpack runs `npm start`'s command).
const express = require("express");

const app = express();
app.get("/", (req, res) => res.type("text/plain").send("hello from node on taxiway\n"));
app.get("/healthz", (req, res) => res.json({ ok: true, node: process.version }));

const port = Number(process.env.PORT || 8080);
app.listen(port, "0.0.0.0", () => console.log(`listening on ${port}`));
