package miroir.peer;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.time.Instant;
import java.util.regex.Pattern;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.Headers;
import org.apache.kafka.common.header.internals.RecordHeaders;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.Stores;

/**
 * topologies/user-referential.toml's `UpdateUserEmail` in the Processor API: each command is
 * checked against the user's entity state (token, authorization, validation), and an accepted
 * one writes the new entity event and the reply; exactly-once v2 puts both, the state and the
 * command's offset in one transaction. The entity state is fed by the entity topic, which
 * shares the commands' partitioning.
 */
final class EmailCommands {
    private static final ObjectMapper JSON = new ObjectMapper();
    private static final String STORE = "users";
    private static final String EVENTS = "entity-events";
    private static final String REPLIES = "replies";
    static final String REPLY_TO = "miroir-reply-to";
    static final String CORRELATION_ID = "miroir-correlation-id";
    static final String TOKEN = "miroir-token";

    private EmailCommands() {}

    /** The processor's topology over `userTopic` and `commandTopic`, verifying tokens with `secret`. */
    static Topology build(String userTopic, String commandTopic, String secret) {
        Topology t = new Topology();
        t.addSource("user-events", Serdes.String().deserializer(), Serdes.String().deserializer(), userTopic);
        t.addSource("commands", Serdes.String().deserializer(), Serdes.String().deserializer(), commandTopic);
        t.addProcessor("apply-event", EntityState::new, "user-events");
        t.addProcessor("update-email", () -> new UpdateEmail(new Tokens(secret)), "commands");
        t.addStateStore(Stores.keyValueStoreBuilder(Stores.persistentKeyValueStore(STORE), Serdes.String(), User.SERDE),
                "apply-event", "update-email");
        t.addSink(EVENTS, userTopic, Serdes.String().serializer(), Serdes.String().serializer(), "update-email");
        t.addSink(REPLIES, (key, value, context) -> text(context.headers(), REPLY_TO),
                Serdes.String().serializer(), Serdes.String().serializer(), "update-email");
        return t;
    }

    static String text(Headers headers, String name) {
        Header h = headers.lastHeader(name);
        return h == null || h.value() == null ? null : new String(h.value(), StandardCharsets.UTF_8);
    }

    /** Applies entity events to the entity state, with the late policy. */
    private static final class EntityState implements Processor<String, String, Void, Void> {
        private KeyValueStore<String, User> users;

        @Override
        public void init(ProcessorContext<Void, Void> context) {
            users = context.getStateStore(STORE);
        }

        @Override
        public void process(Record<String, String> event) {
            if (event.key() == null) {
                return;
            }
            User before = users.get(event.key());
            User after = (before == null ? new User() : before).apply(event.value());
            if (after != before && after.present()) {
                users.put(event.key(), after);
            }
        }
    }

    /** Checks an `UpdateUserEmail` command and answers it. */
    private static final class UpdateEmail implements Processor<String, String, String, String> {
        private static final Pattern EMAIL = Pattern.compile("(?s).+@.+\\..+");

        private final Tokens tokens;
        private ProcessorContext<String, String> context;
        private KeyValueStore<String, User> users;

        UpdateEmail(Tokens tokens) {
            this.tokens = tokens;
        }

        @Override
        public void init(ProcessorContext<String, String> context) {
            this.context = context;
            users = context.getStateStore(STORE);
        }

        @Override
        public void process(Record<String, String> command) {
            if (text(command.headers(), REPLY_TO) == null) {
                return;
            }
            Tokens.Principal principal = tokens.verify(text(command.headers(), TOKEN));
            if (principal == null) {
                reply(command, outcome("unauthenticated", "the bearer token does not hold"));
                return;
            }
            JsonNode payload;
            try {
                payload = JSON.readTree(command.value());
            } catch (IOException | IllegalArgumentException e) {
                reply(command, outcome("rejected", "malformed command"));
                return;
            }
            String id = payload.path("id").asText("");
            String email = payload.path("email").asText("");
            User user = users.get(id);
            if (user == null || !user.present()) {
                reply(command, outcome("rejected", "no such user"));
            } else if (!principal.roles().contains("user-admin") && !principal.id().equals(id)) {
                reply(command, outcome("forbidden", "only the user or a user-admin may change an email"));
            } else if (!EMAIL.matcher(email.trim()).matches() || email.trim().contains(" ")) {
                reply(command, outcome("rejected", "the email must look like name@domain.tld"));
            } else if (email.length() > 254) {
                reply(command, outcome("rejected", "an email has at most 254 characters"));
            } else if (!user.active) {
                reply(command, outcome("rejected", "an inactive user's email cannot change"));
            } else {
                accept(command, user, email.trim().toLowerCase(), principal);
            }
        }

        private void accept(Record<String, String> command, User user, String email, Tokens.Principal principal) {
            UserEvent event = new UserEvent();
            event.id = user.id;
            event.email = email;
            event.name = user.name;
            event.departmentId = user.departmentId;
            event.active = user.active;
            event.version = user.version + 1;
            event.eventType = "UpdateUserEmail";
            event.updatedAt = Instant.now().toString();
            event.changedBy = principal.id();
            String json = event.toJson();
            users.put(user.id, user.apply(json));
            context.forward(new Record<>(user.id, json, command.timestamp(), new RecordHeaders()), EVENTS);
            ObjectNode accepted = JSON.createObjectNode()
                    .put("outcome", "accepted")
                    .put("version", event.version)
                    .put("partition", context.recordMetadata().map(m -> m.partition()).orElse(0))
                    // A processor does not learn the offset its output gets.
                    .put("offset", -1);
            reply(command, accepted);
        }

        private static ObjectNode outcome(String outcome, String message) {
            ObjectNode o = JSON.createObjectNode().put("outcome", outcome).put("message", message);
            if (outcome.equals("rejected")) {
                o.put("code", "rejected");
            }
            return o;
        }

        private void reply(Record<String, String> command, ObjectNode body) {
            Headers headers = new RecordHeaders();
            Header correlation = command.headers().lastHeader(CORRELATION_ID);
            if (correlation != null) {
                headers.add(correlation);
            }
            headers.add(REPLY_TO, command.headers().lastHeader(REPLY_TO).value());
            context.forward(new Record<>(null, body.toString(), command.timestamp(), headers), REPLIES);
        }
    }
}
