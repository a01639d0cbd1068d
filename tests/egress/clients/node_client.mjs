// node node_client.mjs PROXY_URL TARGET_URL CA_FILE
// The test copies this file next to a node_modules with https-proxy-agent from npm.
import fs from "node:fs";
import https from "node:https";
import { HttpsProxyAgent } from "https-proxy-agent";

const [proxy, target, ca] = process.argv.slice(2);
const agent = new HttpsProxyAgent(proxy);
https
  .get(target, { agent, ca: fs.readFileSync(ca) }, (res) => {
    let body = "";
    res.on("data", (d) => (body += d));
    res.on("end", () => {
      console.log(res.statusCode);
      process.stdout.write(body);
    });
  })
  .on("error", (e) => {
    console.log("ERR", e.message);
    process.exit(1);
  });
