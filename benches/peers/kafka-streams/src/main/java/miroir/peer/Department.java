package miroir.peer;

import com.fasterxml.jackson.annotation.JsonIgnoreProperties;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import org.apache.kafka.common.serialization.Serde;

/** A department's row: the newest version applied, older and equal versions dropped. */
@JsonIgnoreProperties(ignoreUnknown = true)
final class Department {
    private static final ObjectMapper JSON = new ObjectMapper();

    public String id;
    public String name;
    public long version;

    /** The row after `json`, or this row when the event is late, a duplicate or malformed. */
    Department apply(String json) {
        try {
            Department event = json == null ? null : JSON.readValue(json, Department.class);
            return event == null || event.id == null || (id != null && event.version <= version)
                    ? this
                    : event;
        } catch (IOException e) {
            return this;
        }
    }

    static final Serde<Department> SERDE = Codec.serde(
            (d, out) -> {
                Codec.writeText(out, d.id);
                Codec.writeText(out, d.name);
                out.writeLong(d.version);
            },
            in -> {
                Department d = new Department();
                d.id = Codec.readText(in);
                d.name = Codec.readText(in);
                d.version = in.readLong();
                return d;
            });
}
