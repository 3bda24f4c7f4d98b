package miroir.peer;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.security.MessageDigest;
import java.util.ArrayList;
import java.util.Base64;
import java.util.List;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

/** Verifies HS256 bearer tokens (JWT) as miroir's master does: signature, expiry, subject, roles. */
final class Tokens {
    private static final ObjectMapper JSON = new ObjectMapper();
    private static final long LEEWAY_SECONDS = 60;

    private final SecretKeySpec key;

    Tokens(String secret) {
        this.key = new SecretKeySpec(secret.getBytes(StandardCharsets.UTF_8), "HmacSHA256");
    }

    /** Who sends a command: the token's subject and roles. */
    record Principal(String id, List<String> roles) {}

    /** The principal `token` proves, or null when it does not hold. */
    Principal verify(String token) {
        if (token == null) {
            return null;
        }
        String[] parts = token.split("\\.");
        if (parts.length != 3) {
            return null;
        }
        try {
            Mac mac = Mac.getInstance("HmacSHA256");
            mac.init(key);
            byte[] expected = mac.doFinal((parts[0] + "." + parts[1]).getBytes(StandardCharsets.US_ASCII));
            byte[] given = Base64.getUrlDecoder().decode(parts[2]);
            if (!MessageDigest.isEqual(expected, given)) {
                return null;
            }
            JsonNode claims = JSON.readTree(Base64.getUrlDecoder().decode(parts[1]));
            long now = System.currentTimeMillis() / 1000;
            if (!claims.path("exp").canConvertToLong() || claims.path("exp").asLong() + LEEWAY_SECONDS < now) {
                return null;
            }
            List<String> roles = new ArrayList<>();
            claims.path("roles").forEach(r -> roles.add(r.asText()));
            String subject = claims.path("sub").asText(null);
            return subject == null ? null : new Principal(subject, roles);
        } catch (GeneralSecurityException | IllegalArgumentException | java.io.IOException e) {
            return null;
        }
    }
}
