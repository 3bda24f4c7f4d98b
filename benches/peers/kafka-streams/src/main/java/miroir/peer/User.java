package miroir.peer;

import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.util.HashMap;
import java.util.Map;
import java.util.Set;
import org.apache.kafka.common.serialization.Serde;

/**
 * A user's row with the user-directory topology's late policy: an event older than one
 * already applied for the same user and operation (`event_type`) is late and dropped; an equal
 * version is a duplicate. Each operation owns the columns it changes (`email-changed` and
 * `UpdateUserEmail` the email, `renamed` the name); other operations write every column, and
 * each column keeps the newest event's value.
 */
final class User {
    private static final int EMAIL = 1;
    private static final int NAME = 2;
    private static final int COLUMNS = 8;

    String id;
    String email;
    String name;
    String departmentId;
    boolean active;
    long version;
    String eventType;
    String updatedAt;
    /** Per column, the version of the event that wrote it last. */
    long[] columnVersions = new long[COLUMNS];
    /** Per operation, the version of the last applied event. */
    Map<String, Long> applied = new HashMap<>();

    /** Whether an event was applied to this user. */
    boolean present() {
        return id != null;
    }

    /**
     * This row after `json` (a new object: Kafka Streams forwards the old aggregate next to the
     * new one), or this row itself when the event is late, a duplicate or malformed.
     */
    User apply(String json) {
        UserEvent event = UserEvent.parse(json);
        if (event == null) {
            return this;
        }
        String operation = event.eventType == null ? "" : event.eventType;
        Long last = applied.get(operation);
        if (last != null && event.version <= last) {
            return this;
        }
        User next = copy();
        next.applied.put(operation, event.version);
        next.merge(event);
        return next;
    }

    private User copy() {
        User u = new User();
        u.id = id;
        u.email = email;
        u.name = name;
        u.departmentId = departmentId;
        u.active = active;
        u.version = version;
        u.eventType = eventType;
        u.updatedAt = updatedAt;
        u.columnVersions = columnVersions.clone();
        u.applied = new HashMap<>(applied);
        return u;
    }

    private void merge(UserEvent event) {
        boolean first = !present();
        Set<Integer> owns = owned(event.eventType);
        Object[] values = {
            event.id, event.email, event.name, event.departmentId,
            event.active, event.version, event.eventType, event.updatedAt
        };
        for (int c = 0; c < COLUMNS; c++) {
            boolean writes = owns == null || (c != EMAIL && c != NAME) || owns.contains(c);
            if (first || (writes && event.version > columnVersions[c])) {
                set(c, values[c]);
                columnVersions[c] = event.version;
            }
        }
    }

    private static Set<Integer> owned(String operation) {
        if (operation == null) {
            return null;
        }
        switch (operation) {
            case "email-changed":
            case "UpdateUserEmail":
                return Set.of(EMAIL);
            case "renamed":
                return Set.of(NAME);
            default:
                return null;
        }
    }

    private void set(int column, Object value) {
        switch (column) {
            case 0 -> id = (String) value;
            case EMAIL -> email = (String) value;
            case NAME -> name = (String) value;
            case 3 -> departmentId = (String) value;
            case 4 -> active = Boolean.TRUE.equals(value);
            case 5 -> version = (Long) value;
            case 6 -> eventType = (String) value;
            default -> updatedAt = (String) value;
        }
    }

    static final Serde<User> SERDE = Codec.serde(User::write, User::read);

    private static void write(User u, DataOutputStream out) throws IOException {
        Codec.writeText(out, u.id);
        Codec.writeText(out, u.email);
        Codec.writeText(out, u.name);
        Codec.writeText(out, u.departmentId);
        out.writeBoolean(u.active);
        out.writeLong(u.version);
        Codec.writeText(out, u.eventType);
        Codec.writeText(out, u.updatedAt);
        for (long v : u.columnVersions) {
            out.writeLong(v);
        }
        out.writeByte(u.applied.size());
        for (Map.Entry<String, Long> e : u.applied.entrySet()) {
            out.writeUTF(e.getKey());
            out.writeLong(e.getValue());
        }
    }

    private static User read(DataInputStream in) throws IOException {
        User u = new User();
        u.id = Codec.readText(in);
        u.email = Codec.readText(in);
        u.name = Codec.readText(in);
        u.departmentId = Codec.readText(in);
        u.active = in.readBoolean();
        u.version = in.readLong();
        u.eventType = Codec.readText(in);
        u.updatedAt = Codec.readText(in);
        for (int c = 0; c < COLUMNS; c++) {
            u.columnVersions[c] = in.readLong();
        }
        int operations = in.readByte();
        for (int i = 0; i < operations; i++) {
            u.applied.put(in.readUTF(), in.readLong());
        }
        return u;
    }
}
